"""Evaluate checkpoints: the library behind ``eval.py`` (docs/method.md §7.2, §8.1).

``evaluate_checkpoints(cfg)`` takes ``eval.resume`` — one checkpoint, or a run directory whose
``checkpoint-<step>.pt`` files are evaluated **newest first** (docs/method.md §11 item 11: upstream sorted
oldest first although its README says newest first) — and runs every metric of ``eval.metrics``
at every sampler of ``sampling`` on each checkpoint's EMA network. Rank 0 appends one JSON line
per (checkpoint, sampler, metric) to ``<checkpoint's directory>/metrics-eval.jsonl``::

    {"checkpoint", "step", "sampler", "num_steps", "cfg_scale", "fp8", "metric", "results",
     "num_images", "num_gpus", "seconds", "timestamp"}

``eval.fp8=true`` samples with the blocks' linear layers as FP8 GEMMs (``DiT.quantize_fp8``, what
``scripts/generate.py --fp8`` runs), so that its cost in FID is measured; the records say which.

What is taken from where: the network (architecture and EMA weights) from the checkpoint and its
stored config; the encoder, samplers, ``eval`` settings and (for ``label_mode=empirical``) the
dataset from the config the user names, so they can be overridden on the command line.

Decisions against upstream (docs/method.md §11 items 11, 14, 15, 23): TF32 follows
``eval.enable_tf32`` (default off, as in training); no sample grids are drawn on rank 0 before
the last checkpoint's FID (they perturbed its RNG upstream); ``eval.batch_size`` is the global
generation batch, split over ranks; the results do not depend on the number of GPUs.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tvm.eval.checkpoints import load_network_for_eval
from tvm.eval.metrics import MetricContext, check_metric_names, compute_metric
from tvm.runtime import distributed
from tvm.runtime.build import encoder_from_config
from tvm.runtime.checkpoint import CheckpointError, find_checkpoints

__all__ = ["RESULTS_FILE", "evaluate_checkpoints", "set_eval_backend_flags"]

RESULTS_FILE = "metrics-eval.jsonl"


def set_eval_backend_flags(cfg: DictConfig) -> None:
    """TF32 per ``eval.enable_tf32`` (upstream forced it on, docs/method.md §11 item 14), cuDNN benchmark."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.enable_tf32
    torch.backends.cudnn.allow_tf32 = cfg.enable_tf32
    torch.backends.cudnn.benchmark = cfg.cudnn_benchmark


def _check_encoder(stored: DictConfig, cfg: DictConfig, path: Path) -> None:
    """The named config must decode with the encoder the checkpoint was trained with."""
    if stored.encoder.class_name != cfg.encoder.class_name:
        raise ValueError(
            f"{path} was trained with encoder {stored.encoder.class_name} but the config names "
            f"{cfg.encoder.class_name}; evaluate it with its own experiment config"
        )
    if stored.encoder != cfg.encoder:
        warnings.warn(
            f"{path}: the encoder settings differ from those it was trained with "
            f"({OmegaConf.to_container(stored.encoder)} vs {OmegaConf.to_container(cfg.encoder)}); "
            "using the named config's",
            RuntimeWarning,
            stacklevel=3,
        )


def _append_jsonl(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def evaluate_checkpoints(cfg: DictConfig) -> list[dict[str, Any]]:
    """Evaluate ``eval.resume`` as configured (module docstring); every rank must call it.

    Returns the records in evaluation order (the same list on every rank).

    Raises:
        CheckpointError: ``eval.resume`` is missing or holds no checkpoint, or a checkpoint is
            unreadable (the message names the file).
        ValueError: ``eval.resume`` unset, an unknown metric, no samplers, or a metric's own
            configuration error (e.g. ``fid50k_full`` without ``eval.ref_stats``).
    """
    ecfg = cfg.eval
    if not ecfg.resume:
        raise ValueError("eval.resume is not set: pass a checkpoint file or a run directory (eval.resume=PATH)")
    check_metric_names(ecfg.metrics, ecfg.ref_stats, "eval.metrics")
    if not cfg.sampling:
        raise ValueError("the config defines no samplers (sampling.<name>.{num_steps, cfg_scale})")
    paths = find_checkpoints(ecfg.resume)
    if not paths:
        raise CheckpointError(f"no checkpoint-<step>.pt files in {ecfg.resume}")

    dist = distributed.init_distributed()
    set_eval_backend_flags(ecfg)
    ctx = MetricContext.from_config(cfg, encoder_from_config(cfg.encoder), dist.device, dist.world_size)
    records: list[dict[str, Any]] = []
    for path in paths:
        net, stored, step = load_network_for_eval(path, device=dist.device, config=cfg)
        _check_encoder(stored, cfg, path)
        if ecfg.fp8:
            net.model.quantize_fp8()
        for metric in ecfg.metrics:
            for sampler, scfg in cfg.sampling.items():
                start = time.time()
                results = compute_metric(metric, net, ctx, scfg.num_steps, scfg.cfg_scale)
                record = {
                    "checkpoint": str(path),
                    "step": step,
                    "sampler": sampler,
                    "num_steps": scfg.num_steps,
                    "cfg_scale": scfg.cfg_scale,
                    "fp8": bool(ecfg.fp8),
                    "metric": metric,
                    "results": results,
                    "num_images": ecfg.num_images,
                    "num_gpus": dist.world_size,
                    "seconds": round(time.time() - start, 3),
                    "timestamp": time.time(),
                }
                records.append(record)
                if dist.is_main:
                    _append_jsonl(path.parent / RESULTS_FILE, record)
                    shown = ", ".join(f"{key} {value:.5g}" for key, value in results.items())
                    print(f"{path.name} step {step} {sampler} {metric}: {shown} ({record['seconds']:.1f}s)", flush=True)
    return records
