"""Networks for evaluation and generation from checkpoints (docs/method.md §7.2 step 4–6, §9).

:func:`load_network_for_eval` returns the **EMA** network of a checkpoint in eval mode, built
from the configuration stored in the checkpoint (``"config"``, a plain dict validated against
the schema with :func:`tvm.config.from_container`), so that evaluation needs no knowledge of the
run. The data facts the network is built for — resolution R of its input, channels C, label
width K — are read from the checkpoint's ``"data"`` entry (``{"resolution", "channels",
"label_dim"}``) when present, and otherwise inferred from the EMA state dict (docs/method.md §9.3)::

    model.x_embedder.proj.weight              [D, C, p, p]
    model.pos_embed                           [1, T, D]      R = p·√T
    model.y_embedder.embedding_table.weight   [K + 1, D]

The authors' ``.pkl`` network pickles hold no configuration this code can read; they are handed
to :mod:`tvm.compat.upstream` together with the experiment config the user names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tvm.config import from_container
from tvm.method.wrapper import TVMWrapper
from tvm.runtime.build import build_network
from tvm.runtime.checkpoint import CheckpointError, checkpoint_step, load_checkpoint, strip_wrapper_prefixes

__all__ = ["DataFacts", "data_facts", "apply_overrides", "load_network_for_eval"]

Overrides = Sequence[str] | None


@dataclass(frozen=True)
class DataFacts:
    """Shape of the data a network was trained on (network space: latents for the SD-VAE)."""

    resolution: int
    channels: int
    label_dim: int


def _shape(state: Mapping[str, torch.Tensor], key: str, ndim: int, path: Path | str) -> tuple[int, ...]:
    if key not in state:
        raise CheckpointError(f"{path}: EMA weights lack {key!r}; cannot infer the data shape (not a TVM DiT?)")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise CheckpointError(f"{path}: {key!r} has shape {list(shape)}, expected {ndim} dimensions")
    return shape


def data_facts(checkpoint: Mapping[str, Any], path: Path | str = "<memory>") -> DataFacts:
    """Resolution, channels and label width: the checkpoint's ``"data"`` entry, else inferred from
    the EMA weights' shapes (module docstring)."""
    stored = checkpoint.get("data")
    if isinstance(stored, Mapping) and {"resolution", "channels", "label_dim"} <= stored.keys():
        return DataFacts(int(stored["resolution"]), int(stored["channels"]), int(stored["label_dim"]))
    state = strip_wrapper_prefixes(checkpoint["ema"])
    _, channels, patch, _ = _shape(state, "model.x_embedder.proj.weight", 4, path)
    _, tokens, _ = _shape(state, "model.pos_embed", 3, path)
    rows, _ = _shape(state, "model.y_embedder.embedding_table.weight", 2, path)
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise CheckpointError(f"{path}: model.pos_embed has {tokens} tokens, not a square grid")
    return DataFacts(resolution=grid * patch, channels=channels, label_dim=rows - 1)


def apply_overrides(cfg: DictConfig, overrides: Overrides) -> DictConfig:
    """``cfg`` merged with dot-list overrides ``["key=value", …]``; unknown keys are errors (schema)."""
    if not overrides:
        return cfg
    try:
        merged = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as exc:
        raise ValueError(f"bad config override {list(overrides)}: {exc}") from exc
    assert isinstance(merged, DictConfig)  # merged into a DictConfig
    return merged


def _load_upstream(
    path: Path, config: DictConfig | None, overrides: Overrides, device: torch.device
) -> tuple[TVMWrapper, DictConfig, int | None]:
    """An authors' ``network-snapshot-*.pkl`` through :mod:`tvm.compat.upstream` (docs/method.md §9)."""
    try:
        from tvm.compat.upstream import load_upstream_network
    except ModuleNotFoundError as exc:
        if exc.name != "tvm.compat.upstream":
            raise
        raise CheckpointError(
            f"{path}: the authors' .pkl networks are read by tvm.compat.upstream, which this installation lacks"
        ) from exc
    if config is None:
        raise ValueError(
            f"{path}: an upstream .pkl carries no configuration this code can read; name the "
            "experiment config it was trained with (e.g. im256_w2)"
        )
    config = apply_overrides(config, overrides)
    net = load_upstream_network(path, config, device)
    net.eval().requires_grad_(False)
    return net, config, None


def load_network_for_eval(
    path: str | os.PathLike[str],
    config_overrides: Overrides = None,
    device: torch.device | str = "cpu",
    config: DictConfig | None = None,
) -> tuple[TVMWrapper, DictConfig, int | None]:
    """The EMA network of a checkpoint, in eval mode without gradients, on ``device``.

    Args:
        path: our ``checkpoint-<step>.pt`` (or any file in our format), or an authors' ``.pkl``.
        config_overrides: ``["network.attn_backend=math", …]`` applied to the stored config
            before the network is built (e.g. attention backend, precision).
        device: where the network lives.
        config: the experiment config for an authors' ``.pkl`` (ignored for our checkpoints).

    Returns:
        ``(network, config, step)``: the stored config (with overrides) and the optimizer step
        of the checkpoint (None for an authors' pickle, whose file names count ticks).

    Raises:
        CheckpointError: the file is missing, unreadable, corrupt, not in our format, or its
            weights or stored config do not fit this code; the message names the file.
    """
    path = Path(path)
    device = torch.device(device)
    if path.suffix == ".pkl":
        return _load_upstream(path, config, config_overrides, device)
    checkpoint = load_checkpoint(path, require=("ema", "config"))
    try:
        cfg = from_container(checkpoint["config"])
    except OmegaConfBaseException as exc:
        raise CheckpointError(f"{path}: the stored config does not fit this code's schema: {exc}") from exc
    cfg = apply_overrides(cfg, config_overrides)
    facts = data_facts(checkpoint, path)
    net = build_network(cfg.network, facts.resolution, facts.channels, facts.label_dim, device, init=False)
    try:
        net.load_state_dict(strip_wrapper_prefixes(checkpoint["ema"]))
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: the EMA weights do not fit the network built from its config: {exc}") from exc
    net.eval().requires_grad_(False)
    progress = checkpoint.get("progress") or {}
    step = progress.get("step", checkpoint_step(path))
    return net, cfg, step
