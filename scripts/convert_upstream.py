"""Convert an authors' network pickle into our checkpoint format (docs/method.md §9), safely.

Usage::

    python scripts/convert_upstream.py SRC.pkl DST.pt --config im256_w2 [key=value ...]

``SRC.pkl`` is a released file (``im256_w2.pkl``, ``im256_w1p75.pkl``, ``im512_w2p5.pkl``) or a
``network-snapshot-*.pkl`` of an upstream run. It is read by :mod:`tvm.compat.upstream`, which
never executes code from the pickle and maps CUDA storages to the CPU. ``DST.pt`` is written
atomically by ``tvm.runtime.checkpoint.save_checkpoint`` and loads with ``weights_only=True``:

- ``ema``, ``net`` and ``ema_target``: the pickle's EMA weights (``model.*`` names);
- ``config``: the named config plus the overrides, with the model facts read from the pickle
  (``network.model_type`` and size overrides, ``network.do_scale_param``, ``dataset.resolution``,
  ``dataset.use_labels``); the sampling cfg scales and the encoder statistics, which the pickle
  does not hold, come from the config, so name the one the file was trained with
  (``im256_w2.pkl`` → ``--config im256_w2``, ``im512_w2p5.pkl`` → ``--config im512_w2p5``);
- ``progress``: zeros; ``source``: the pickle's path, SHA-256 and facts (latent resolution,
  channels, label count, sizes, recorded wrapper settings).

Then:

- sample or evaluate: pass ``DST.pt`` wherever a checkpoint is accepted, e.g.
  ``python scripts/generate.py`` with the checkpoint, or ``eval.py ... eval.resume=DST.pt``;
- fine-tune: ``bash train.sh NGPU im256_w2 training.transfer=DST.pt dataset.path=...``, which loads
  the ``ema`` weights into the online network, the EMA and the target EMA and starts at step 0.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tvm.compat.upstream import checkpoint_from_upstream
from tvm.config import compose_config
from tvm.runtime.checkpoint import save_checkpoint


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", type=Path, help="authors' network pickle (.pkl)")
    parser.add_argument("dst", type=Path, help="our checkpoint to write (.pt)")
    parser.add_argument("--config", required=True, help="config name under configs/ (e.g. im256_w2)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing DST")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides applied to the config (key=value)")
    return parser.parse_intermixed_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.dst.exists() and not args.force:
        print(f"error: {args.dst} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    state = checkpoint_from_upstream(args.src, compose_config(args.config, args.overrides))
    save_checkpoint(args.dst, state)
    facts = state["source"]["facts"]
    print(
        f"wrote {args.dst}: {facts['model_type']} (D={facts['hidden_size']}, depth {facts['depth']}, "
        f"{facts['num_heads']} heads), latent {facts['img_channels']}x{facts['img_resolution']}^2, "
        f"{facts['label_dim']} labels, do_scale_param={state['config']['network']['do_scale_param']}; "
        f"{len(state['ema'])} tensors from {args.src} (sha256 {state['source']['sha256'][:12]}…)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
