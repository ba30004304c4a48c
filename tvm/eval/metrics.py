"""Metrics of a network's samples, shared by the training loop's periodic evaluation and eval.py.

Each metric maps (network, encoder, sampler settings) to a dict of numbers; the registry below is
explicit. Generation is sharded over ranks by image index (:mod:`tvm.eval.generate`), so the
numbers do not depend on the number of GPUs.

``fid50k_full`` (TVM.md §7.1) differs from upstream on purpose (TVM.md §11 item 15): class
labels are uniform by default (``label_mode="empirical"`` draws them from the training set's
label frequencies, as upstream), every image is seeded by its index rather than by rank, and the
generated-set covariance is unbiased (:mod:`tvm.eval.fid`).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

from tvm.eval import fid
from tvm.eval.generate import decoded_resolution, generate_images, image_classes
from tvm.method.wrapper import TVMWrapper
from tvm.train import distributed


@dataclass
class MetricContext:
    """What every metric needs besides the network. ``batch_size`` is the per-rank generation batch."""

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


@functools.cache
def _detector(url_or_path: str, device: str) -> fid.Detector:
    """The Inception detector, loaded once per process; rank 0 first (it may download the file),
    so that a missing file fails on every rank with fid.py's message saying where to put it."""
    error = None
    if distributed.is_main():
        try:
            detector = fid.load_inception_detector(url_or_path, device=device)
        except (OSError, ImportError, ValueError, RuntimeError) as exc:
            error = exc
    message = distributed.broadcast_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    if message is not None:
        raise RuntimeError(f"rank 0 could not load the detector {url_or_path}: {message}")
    if not distributed.is_main():
        detector = fid.load_inception_detector(url_or_path, device=device)
    return detector


def fid50k_full_metric(net: TVMWrapper, ctx: MetricContext, steps: int, cfg: float) -> dict[str, float]:
    """FID of ``ctx.num_images or 50000`` samples against ``ctx.ref_stats`` (TVM.md §7.1).

    Image ``i`` has noise and class seeded by ``(ctx.seed, i)``; rank ``r`` of ``W`` generates the
    indices ``i ≡ r (mod W)`` and :func:`tvm.eval.fid.compute_fid` gathers the features in index
    order, so the value does not depend on the number of GPUs.
    """
    if not ctx.ref_stats:
        raise ValueError("fid50k_full needs reference statistics: set eval.ref_stats to the authors' "
                         "img256.pkl / img512.pkl or an .npz made by scripts/ref_stats.py")
    if not ctx.detector_url:
        raise ValueError("fid50k_full needs the Inception detector: set eval.detector_url to its URL or a local file")
    ref = fid.load_ref_stats(ctx.ref_stats, expected_resolution=decoded_resolution(net, ctx.encoder))
    detector = _detector(str(ctx.detector_url), str(ctx.device))
    num_classes = net.model.num_classes

    def generate(indices: range) -> torch.Tensor:
        classes = image_classes(indices, num_classes, ctx.seed, ctx.label_mode, ctx.class_probs)
        return generate_images(net, ctx.encoder, indices, steps=steps, cfg=cfg, seed=ctx.seed, classes=classes,
                               batch_size=ctx.batch_size, device=ctx.device)

    value = fid.compute_fid(generate, detector, ref, num_images=ctx.num_images or 50000, batch_size=ctx.batch_size,
                            rank=distributed.get_rank(), world_size=distributed.get_world_size(), device=ctx.device)
    return {"fid": value}


METRICS: dict[str, Callable[..., dict[str, float]]] = {"digits": digits_metric, "fid50k_full": fid50k_full_metric}


def compute_metric(name: str, net: TVMWrapper, ctx: MetricContext, steps: int, cfg: float) -> dict[str, float]:
    """Run metric ``name``; ValueError listing the known metrics otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return METRICS[name](net, ctx, steps, cfg)
