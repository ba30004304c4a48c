#!/usr/bin/env python
"""Sample images from a checkpoint's EMA network (docs/method.md §4; replaces upstream's broken
``generate_images.py``, docs/method.md §11 item 12).

Examples::

    python scripts/generate.py --ckpt outputs/tiny --steps 2 --seeds 0-99 --out samples/
    python scripts/generate.py --ckpt run/checkpoint-00300000.pt --steps 1 --cfg 1 --out uncond.npz
    torchrun --nproc_per_node=8 scripts/generate.py --ckpt run/ --seeds 0-49999 --out fid50k.npz

``--ckpt`` is a checkpoint or a run directory (its newest checkpoint); an authors' ``.pkl``
needs ``--config`` (the experiment it was trained with). Image ``i`` of ``--seeds`` uses the
noise and (without ``--classes``) the uniform class seeded by ``(--seed, i)``, so the images do
not depend on the number of processes or ``--batch``. ``--classes 1,2,3`` cycles through the
given classes in the order of ``--seeds``. Output: a folder of ``NNNNNN.png`` (the image index)
or an ``.npz`` with ``images`` uint8 [N, H, W, C], ``seeds`` and ``labels`` (conditional models).
An existing ``.npz`` or a folder that holds files is refused unless ``--force`` (which replaces
the ``.npz``, or deletes the folder's old ``NNNNNN.png`` images first).
"""

import argparse
import sys
from collections.abc import Sequence

from tvm.compiling import allow_tracing_this_package, compile_options
from tvm.config import compose_config
from tvm.eval.checkpoints import load_network_for_eval
from tvm.eval.generate import check_output, default_cfg_scale, generate_to, parse_classes, parse_index_ranges
from tvm.runtime import distributed
from tvm.runtime.build import encoder_from_config
from tvm.runtime.checkpoint import CheckpointError, find_checkpoints


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def guidance_scale(text: str) -> float:
    """argparse type: a guidance scale w >= 1 (1 = unguided)."""
    value = float(text)
    if not value >= 1.0:
        raise argparse.ArgumentTypeError(f"the guidance scale must be >= 1 (1 = unguided), got {text}")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="checkpoint file or run directory (newest checkpoint)")
    parser.add_argument("--out", required=True, help="output folder (PNG files) or a .npz file")
    parser.add_argument("--steps", type=positive_int, default=1, help="sampler steps = network evaluations (1, 2, 4)")
    parser.add_argument(
        "--cfg",
        dest="guidance",
        type=guidance_scale,
        default=None,
        help="guidance scale w >= 1 (1 = unguided); default: the config's sampler with --steps",
    )
    parser.add_argument("--seeds", default="0-63", help="image indices, e.g. 0-49999 or 0-9,20 (default 0-63)")
    parser.add_argument("--seed", type=int, default=0, help="base seed combined with each image index")
    parser.add_argument(
        "--classes", default=None, help="class list cycled over the images, e.g. 1,2,3 (default: uniform per image)"
    )
    parser.add_argument("--batch", type=positive_int, default=64, help="images per process and batch")
    parser.add_argument("--config", default=None, help="experiment config for an authors' .pkl network")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override applied before building the network/encoder (repeatable)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="overwrite an existing --out (.npz replaced; a folder's old NNNNNN.png deleted first)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument(
        "--compile",
        nargs="?",
        const="default",
        default=None,
        choices=["default", "max-autotune-no-cudagraphs"],
        metavar="MODE",
        help="torch.compile the whole DiT, in torch.compile mode MODE (default: %(const)s; "
        "max-autotune-no-cudagraphs autotunes GEMM templates, minutes longer to compile). Worth it for "
        "many images on a GPU: 1903 img/s against 1746 block by block, DiT-XL/2 on an H200, "
        "docs/benchmarks.md. CUDA graphs are not offered: the sampler feeds a step's output back in",
    )
    parser.add_argument(
        "--gelu-epilogue",
        action="store_true",
        help="on a GPU, run each block's fc1 + GELU as one GEMM with the GELU in its epilogue (one pass less over "
        "the MLP's activations; differs from the unfused network by the bf16 rounding of the pre-activation). "
        "With --compile, DiT-XL/2 at batch 256 on an H100: 135.0 -> 126.9 ms per 1-step call, 1896 -> 2017 img/s "
        "(docs/benchmarks.md, Round 8)",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="run each block's qkv, proj, fc1 and fc2 as FP8 (e4m3) GEMMs with row-wise scales: twice the bf16 "
        "tensor-core rate on an H100 or newer, at the cost of rounding both operands to 3 mantissa bits, which "
        "changes the images (measure its FID with eval.sh ... eval.fp8=true before relying on it). "
        "Not with --gelu-epilogue",
    )
    args = parser.parse_args(argv)
    if args.fp8 and args.gelu_epilogue:
        parser.error("--fp8 and --gelu-epilogue cannot be combined (the GELU epilogue is a bf16 GEMM)")

    try:
        dist = distributed.init_distributed(device=args.device)
        indices = parse_index_ranges(args.seeds)
        stale = check_output(args.out, args.force)  # before the network is loaded: refuse early
        paths = find_checkpoints(args.ckpt)
        if not paths:
            raise CheckpointError(f"no checkpoint-<step>.pt files in {args.ckpt}")
        config = compose_config(args.config) if args.config else None
        net, cfg, step = load_network_for_eval(paths[0], args.override, dist.device, config=config)
        if args.gelu_epilogue:
            net.model.fuse_gelu_epilogue()
        if args.fp8:
            net.model.quantize_fp8()
        if args.compile is not None:  # after the fusion and FP8 switches, which the compiled graph bakes in
            allow_tracing_this_package()
            net.model.compile(**compile_options(args.compile, cuda_graphs=False))
        classes = parse_classes(args.classes, net.model.num_classes) if args.classes else None
        guidance = args.guidance if args.guidance is not None else default_cfg_scale(cfg.sampling, args.steps)
        if dist.is_main:
            print(
                f"{paths[0]} (step {step}): {len(indices)} images, {args.steps} step(s), guidance {guidance}, "
                f"{dist.world_size} process(es) -> {args.out}",
                flush=True,
            )
            for path in stale:  # --force on a folder: none of its old images may remain
                path.unlink(missing_ok=True)
        distributed.barrier()
        out = generate_to(
            net,
            encoder_from_config(cfg.encoder),
            indices,
            args.out,
            steps=args.steps,
            guidance=guidance,
            seed=args.seed,
            classes=classes,
            batch_size=args.batch,
            device=dist.device,
        )
    except (CheckpointError, ValueError, OSError) as exc:
        print(f"generate.py: error: {exc}", file=sys.stderr)
        return 1
    finally:
        distributed.cleanup()
    if dist.is_main:
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    distributed.exit_process(main())  # not sys.exit: see its docstring
