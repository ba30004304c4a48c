"""Metrics of a network's samples, shared by the training loop's periodic evaluation and eval.py.

Each metric maps (network, encoder, sampler settings) to a dict of numbers; the registry below is
explicit. Generation is sharded over ranks by image index (:mod:`tvm.eval.generate`), so the
numbers do not depend on the number of GPUs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from tvm.eval.generate import generate_images, image_classes
from tvm.method.wrapper import TVMWrapper
from tvm.train import distributed


@dataclass
class MetricContext:
    """What every metric needs besides the network."""

    encoder: Any
    device: torch.device
    seed: int = 0
    batch_size: int = 64
    num_images: int | None = None       # None: the metric's own default
    label_mode: str = "uniform"
    class_probs: np.ndarray | None = None
    detector_url: str | None = None
    ref_stats: str | None = None


def sharded_generate(net: TVMWrapper, ctx: MetricContext, num_images: int, steps: int, cfg: float
                     ) -> tuple[torch.Tensor, np.ndarray]:
    """All ``num_images`` images and their classes on every rank, generated ``i ≡ rank (mod W)``."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = list(range(rank, num_images, world))
    classes = image_classes(range(num_images), net.model.num_classes, ctx.seed, ctx.label_mode, ctx.class_probs)
    images = generate_images(net, ctx.encoder, mine, steps=steps, cfg=cfg, seed=ctx.seed, classes=classes[mine],
                             batch_size=ctx.batch_size, device=ctx.device)
    parts = distributed.all_gather_object(images)
    full = torch.empty((num_images, *images.shape[1:]), dtype=torch.uint8)
    for r, part in enumerate(parts):
        full[r::world] = part
    return full, classes


@functools.cache
def _digits_metrics():
    from tvm.eval.small import DigitsMetrics

    return DigitsMetrics()


def digits_metric(net: TVMWrapper, ctx: MetricContext, steps: int, cfg: float) -> dict[str, float]:
    """Fréchet distance (pixels, float64) and classifier accuracy on the embedded digits."""
    images, classes = sharded_generate(net, ctx, ctx.num_images or 1000, steps, cfg)
    metrics = _digits_metrics()
    return {"frechet": metrics.frechet(images), "accuracy": metrics.accuracy(images, classes)}


METRICS: dict[str, Callable[..., dict[str, float]]] = {"digits": digits_metric}


def compute_metric(name: str, net: TVMWrapper, ctx: MetricContext, steps: int, cfg: float) -> dict[str, float]:
    """Run metric ``name``; ValueError listing the known metrics otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return METRICS[name](net, ctx, steps, cfg)
