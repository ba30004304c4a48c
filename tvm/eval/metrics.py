"""Metrics of a network's samples, shared by the training loop's periodic evaluation and eval.py.

Each metric maps (network, encoder, sampler settings) to a dict of numbers; the registry below is
explicit. Generation is sharded over ranks by image index (:mod:`tvm.eval.generate`), so the
numbers do not depend on the number of GPUs.

``fid50k_full`` (docs/method.md §7.1) differs from upstream on purpose (docs/method.md §11 item 15): class
labels are uniform by default (``label_mode="empirical"`` draws them from the training set's
label frequencies, as upstream), every image is seeded by its index rather than by rank, and the
generated-set covariance is unbiased (:mod:`tvm.eval.fid`).

Optional metrics (:mod:`tvm.eval.extra_metrics`), run only where their networks are available:
``is50k`` (Inception Score, ``eval.detector_url``), ``pr50k3_full`` (precision/recall, k = 3,
against ``eval.ref_features`` computed with ``eval.pr_detector_url``) and ``fd_dinov2`` (Fréchet
distance of DINOv2 ViT-L/14 features, ``eval.dinov2``, against ``eval.dinov2_ref_stats`` or the
``'fd_dinov2'`` entry of an EDM2 ``eval.ref_stats`` pickle). All share the index-sharded
generation of ``fid50k_full`` (:func:`index_generator`, :func:`tvm.eval.fid.generated_features`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import numpy as np
import torch

from tvm.data.encoders import Encoder
from tvm.eval import extra_metrics, fid
from tvm.eval.generate import decoded_resolution, generate_images, image_classes
from tvm.method.wrapper import TVMWrapper
from tvm.runtime import distributed
from tvm.runtime.build import ImageDataset, build_dataset


@dataclass
class MetricContext:
    """What every metric needs besides the network. ``batch_size`` is the per-rank generation batch."""

    encoder: Any
    device: torch.device
    seed: int = 0
    batch_size: int = 64
    num_images: int | None = None  # None: the metric's own default
    label_mode: str = "uniform"
    class_probs: np.ndarray | None = None
    detector_url: str | None = None
    ref_stats: str | None = None
    ref_features: str | None = None  # pr50k3_full: .npz with 'features' (extra_metrics.save_ref_features)
    pr_detector_url: str | None = None  # pr50k3_full: feature network (StyleGAN's VGG-16), as detector_url
    dinov2: str | None = None  # fd_dinov2: TorchScript file, local hub checkout or hub repo name
    dinov2_weights: str | None = None  # fd_dinov2: local state dict for a hub checkout
    dinov2_ref_stats: str | None = None  # fd_dinov2: .npz (mu, sigma) or EDM2 pkl; default: ref_stats if a pkl
    dinov2_allow_download: bool = False

    @classmethod
    def from_config(
        cls, cfg: Any, encoder: Encoder, device: torch.device, world_size: int, dataset: ImageDataset | None = None
    ) -> MetricContext:
        """The context of a run's ``eval`` section: the one constructor of the training loop and eval.py.

        ``batch_size`` is ``ceil(eval.batch_size / world_size)`` (at least 1): ``eval.batch_size``
        is the global generation batch and no rank gets less than its share. At world size 1 it is
        ``eval.batch_size`` itself; at world sizes that do not divide it, the training loop's
        periodic metrics now batch one image more per rank than before (it rounded down; eval.py
        always rounded up). Each image's noise and class depend only on its index, so the
        generated set is the same; only the batch grouping of the network calls differs.
        ``label_mode=empirical`` takes the class frequencies of ``dataset`` (default: the
        config's ``dataset`` section, built here) in float64.
        """
        ecfg = cfg.eval
        class_probs = None
        if ecfg.label_mode == "empirical":
            class_probs = class_frequencies(dataset if dataset is not None else build_dataset(cfg.dataset))
        optional = (
            "ref_features",
            "pr_detector_url",
            "dinov2",
            "dinov2_weights",
            "dinov2_ref_stats",
            "dinov2_allow_download",
        )  # absent keys keep their defaults, so older configs still work
        return cls(
            encoder=encoder,
            device=device,
            seed=ecfg.seed,
            batch_size=max(1, math.ceil(ecfg.batch_size / world_size)),
            num_images=ecfg.num_images,
            label_mode=ecfg.label_mode,
            class_probs=class_probs,
            detector_url=ecfg.detector_url,
            ref_stats=ecfg.ref_stats,
            **{key: ecfg.get(key) for key in optional if ecfg.get(key) is not None},
        )


def class_frequencies(dataset: ImageDataset) -> np.ndarray:
    """Float64 ``[K]`` label frequencies of a labelled dataset (upstream's FID label distribution)."""
    if not getattr(dataset, "has_labels", False):
        raise ValueError("eval.label_mode=empirical needs a labelled dataset (dataset.use_labels=true)")
    counts = sum(np.asarray(dataset.get_label(i), dtype=np.float64) for i in range(len(dataset)))
    assert isinstance(counts, np.ndarray), "the dataset is empty"
    return counts / counts.sum()


def sharded_generate(
    net: TVMWrapper, ctx: MetricContext, num_images: int, steps: int, guidance: float
) -> tuple[torch.Tensor, np.ndarray]:
    """All ``num_images`` images and their classes on every rank, generated ``i ≡ rank (mod W)``."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    mine = list(range(rank, num_images, world))
    classes = image_classes(range(num_images), net.model.num_classes, ctx.seed, ctx.label_mode, ctx.class_probs)
    images = generate_images(
        net,
        ctx.encoder,
        mine,
        steps=steps,
        guidance=guidance,
        seed=ctx.seed,
        classes=classes[mine],
        batch_size=ctx.batch_size,
        device=ctx.device,
    )
    return distributed.gather_interleaved(images, num_images), classes


@functools.cache
def _digits_metrics():
    from tvm.eval.small import DigitsMetrics

    return DigitsMetrics()


def digits_metric(net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """Fréchet distance (pixels, float64) and classifier accuracy on the embedded digits."""
    images, classes = sharded_generate(net, ctx, ctx.num_images or 1000, steps, guidance)
    metrics = _digits_metrics()
    return {"frechet": metrics.frechet(images), "accuracy": metrics.accuracy(images, classes)}


T = TypeVar("T")


def _rank0_first(load: Callable[[], T], what: str) -> T:
    """``load()`` on rank 0 first (it may download), then on the others; a failure on rank 0 is
    raised on every rank (rank 0 with its own exception and message saying where to put files)."""
    error = None
    if distributed.is_main():
        try:
            loaded = load()
        except (OSError, ImportError, ValueError, RuntimeError) as exc:
            error = exc
    distributed.raise_on_every_rank(error, lambda message, _: RuntimeError(f"rank 0 could not load {what}: {message}"))
    if not distributed.is_main():
        loaded = load()
    return loaded


@functools.cache
def _detector(url_or_path: str, device: str) -> fid.Detector:
    """The Inception detector, loaded once per process; rank 0 first (it may download the file),
    so that a missing file fails on every rank with fid.py's message saying where to put it."""
    return _rank0_first(lambda: fid.load_inception_detector(url_or_path, device=device), f"the detector {url_or_path}")


@functools.cache
def _dinov2(source: str, weights: str | None, allow_download: bool, device: str) -> extra_metrics.DINOv2Detector:
    """DINOv2, loaded once per process, rank 0 first (:func:`tvm.eval.extra_metrics.load_dinov2`)."""
    return _rank0_first(
        lambda: extra_metrics.load_dinov2(source, device=device, weights=weights, allow_download=allow_download),
        f"DINOv2 {source}",
    )


def index_generator(
    net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float
) -> Callable[[range], torch.Tensor]:
    """``generate(indices) -> uint8 [len(indices), 3, H, W]``: image ``i`` has noise and class
    seeded by ``(ctx.seed, i)`` whatever the rank, so the image set does not depend on ``W``."""
    num_classes = net.model.num_classes

    def generate(indices: range) -> torch.Tensor:
        classes = image_classes(indices, num_classes, ctx.seed, ctx.label_mode, ctx.class_probs)
        return generate_images(
            net,
            ctx.encoder,
            indices,
            steps=steps,
            guidance=guidance,
            seed=ctx.seed,
            classes=classes,
            batch_size=ctx.batch_size,
            device=ctx.device,
        )

    return generate


def _generated(
    net: TVMWrapper,
    ctx: MetricContext,
    steps: int,
    guidance: float,
    features: Callable[[torch.Tensor], torch.Tensor],
    num_images: int,
    expected_resolution: int | None,
    desc: str,
) -> torch.Tensor | None:
    """``features`` of ``num_images`` generated images, sharded by index, gathered on rank 0 (else None)."""
    return fid.generated_features(
        index_generator(net, ctx, steps, guidance),
        features,
        num_images,
        batch_size=ctx.batch_size,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        expected_resolution=expected_resolution,
        desc=desc,
    )


def _on_rank0(compute: Callable[[torch.Tensor], dict[str, float]], gathered: torch.Tensor | None) -> dict[str, float]:
    """``compute(gathered)`` on rank 0, its result (or its error, re-raised) on every rank."""
    values, error = None, None
    if gathered is not None:
        try:
            values = compute(gathered)
        except (ValueError, RuntimeError) as exc:
            error = exc
    distributed.raise_on_every_rank(error, lambda message, _: RuntimeError(f"rank 0 failed: {message}"))
    return distributed.broadcast_object(values)


def _required(value: Any, message: str) -> Any:
    """``value``, or ValueError(``message``) when it is unset (a metric's required setting)."""
    if not value:
        raise ValueError(message)
    return value


def _frechet_distance(
    net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float, detector: Any, ref: Any
) -> float:
    """Fréchet distance of ``detector`` features of ``ctx.num_images or 50000`` samples against
    ``ref``: image ``i`` has noise and class seeded by ``(ctx.seed, i)``; rank ``r`` of ``W`` generates
    the indices ``i ≡ r (mod W)`` and :func:`tvm.eval.fid.compute_fid` gathers the features in index
    order, so the value does not depend on the number of GPUs."""
    return fid.compute_fid(
        index_generator(net, ctx, steps, guidance),
        detector,
        ref,
        num_images=ctx.num_images or 50000,
        batch_size=ctx.batch_size,
        rank=distributed.get_rank(),
        world_size=distributed.get_world_size(),
        device=ctx.device,
    )


def fid50k_full_metric(net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """FID of ``ctx.num_images or 50000`` samples against ``ctx.ref_stats`` (docs/method.md §7.1),
    sharded over the ranks as :func:`_frechet_distance` says."""
    ref_stats = _required(
        ctx.ref_stats,
        "fid50k_full needs reference statistics: set eval.ref_stats to the "
        "authors' img256.pkl / img512.pkl or an .npz made by scripts/ref_stats.py",
    )
    detector_url = _required(
        ctx.detector_url, "fid50k_full needs the Inception detector: set eval.detector_url to its URL or a local file"
    )
    ref = fid.load_ref_stats(ref_stats, expected_resolution=decoded_resolution(net, ctx.encoder))
    detector = _detector(str(detector_url), str(ctx.device))
    return {"fid": _frechet_distance(net, ctx, steps, guidance, detector, ref)}


IS_SPLITS = 10
PR_K = 3


def is50k_metric(net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """Inception Score (10 splits) of ``ctx.num_images or 50000`` samples: ``is_mean``, ``is_std``.

    Needs a detector that gives class probabilities from ``detector(images, return_features=False)``
    (NVIDIA's StyleGAN3 Inception, ``eval.detector_url``; see
    :func:`tvm.eval.extra_metrics.detector_probabilities`).
    """
    if not ctx.detector_url:
        raise ValueError("is50k needs the Inception detector: set eval.detector_url to its URL or a local file")
    num_images = ctx.num_images or 50000
    if num_images < IS_SPLITS:
        raise ValueError(f"is50k needs at least {IS_SPLITS} images (one per split), got eval.num_images={num_images}")
    detector = _detector(str(ctx.detector_url), str(ctx.device))

    def probabilities(images: torch.Tensor) -> torch.Tensor:
        return extra_metrics.detector_probabilities(detector, images, ctx.device)

    probs = _generated(net, ctx, steps, guidance, probabilities, num_images, None, "IS probabilities")

    def score(probs: torch.Tensor) -> dict[str, float]:
        mean, std = extra_metrics.inception_score(probs, splits=IS_SPLITS)
        return {"is_mean": mean, "is_std": std}

    return _on_rank0(score, probs)


def pr50k3_full_metric(net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019, k = 3) of ``ctx.num_images or 50000``
    samples against all reference features in ``ctx.ref_features``, both from the network
    ``ctx.pr_detector_url`` (StyleGAN's VGG-16 by default; the reference file must come from the same
    network). Distances are computed on rank 0 (``ctx.device``) in float64."""
    ref_features = _required(
        ctx.ref_features,
        "pr50k3_full needs reference features: set eval.ref_features to "
        "an .npz made by scripts/ref_features.py (with the network of eval.pr_detector_url)",
    )
    _required(
        ctx.pr_detector_url, "pr50k3_full needs a feature network: set eval.pr_detector_url to its URL or a local file"
    )
    ref = extra_metrics.load_ref_features(ref_features, expected_resolution=decoded_resolution(net, ctx.encoder))
    num_images = ctx.num_images or 50000
    if min(num_images, len(ref.features)) <= PR_K:
        raise ValueError(
            f"pr50k3_full needs more than {PR_K} generated and reference images, got {num_images} and "
            f"{len(ref.features)}"
        )
    detector = _detector(str(ctx.pr_detector_url), str(ctx.device))

    def features(images: torch.Tensor) -> torch.Tensor:
        return fid.compute_features(detector, images, ctx.device)

    gen = _generated(net, ctx, steps, guidance, features, num_images, ref.resolution, "PR features")

    def pr(gen: torch.Tensor) -> dict[str, float]:
        if gen.shape[1] != ref.features.shape[1]:
            raise ValueError(
                f"{ctx.ref_features}: reference features are {ref.features.shape[1]}-d but "
                f"{ctx.pr_detector_url} gives {gen.shape[1]}-d features"
            )
        precision, recall = extra_metrics.precision_recall(ref.features, gen, k=PR_K, device=ctx.device)
        return {"precision": precision, "recall": recall}

    return _on_rank0(pr, gen)


def _dinov2_ref_path(ctx: MetricContext) -> str:
    if ctx.dinov2_ref_stats:
        return ctx.dinov2_ref_stats
    if ctx.ref_stats and Path(ctx.ref_stats).suffix != ".npz":
        return ctx.ref_stats  # EDM2's pickle holds 'fid' and 'fd_dinov2' entries
    raise ValueError(
        "fd_dinov2 needs DINOv2 reference statistics: set eval.dinov2_ref_stats to an .npz made by "
        "scripts/ref_features.py --dinov2, or eval.ref_stats to an EDM2 pickle with an 'fd_dinov2' entry"
    )


def fd_dinov2_metric(net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """Fréchet distance of DINOv2 ViT-L/14 features (unbiased covariances) of ``ctx.num_images or
    50000`` samples against ``ctx.dinov2_ref_stats`` (``.npz`` ``mu``/``sigma``, or an EDM2 pickle's
    ``'fd_dinov2'`` entry read by the numpy-only unpickler). Sharded exactly as ``fid50k_full``."""
    ref_path = _dinov2_ref_path(ctx)
    if not ctx.dinov2:
        raise ValueError(
            "fd_dinov2 needs DINOv2: set eval.dinov2 to a local checkout, a TorchScript file or "
            f"{extra_metrics.DINOV2_HUB_REPO} (its torch.hub cache)"
        )
    ref = fid.load_ref_stats(ref_path, expected_resolution=decoded_resolution(net, ctx.encoder), key="fd_dinov2")
    detector = _dinov2(str(ctx.dinov2), ctx.dinov2_weights, bool(ctx.dinov2_allow_download), str(ctx.device))
    return {"fd_dinov2": _frechet_distance(net, ctx, steps, guidance, detector, ref)}


METRICS: dict[str, Callable[..., dict[str, float]]] = {
    "digits": digits_metric,
    "fid50k_full": fid50k_full_metric,
    "is50k": is50k_metric,
    "pr50k3_full": pr50k3_full_metric,
    "fd_dinov2": fd_dinov2_metric,
}


def compute_metric(name: str, net: TVMWrapper, ctx: MetricContext, steps: int, guidance: float) -> dict[str, float]:
    """Run metric ``name``; ValueError listing the known metrics otherwise."""
    if name not in METRICS:
        raise ValueError(f"unknown metric {name!r}; allowed: {', '.join(METRICS)}")
    return METRICS[name](net, ctx, steps, guidance)


def check_metric_names(metrics: Sequence[str], ref_stats: str | None, key: str) -> None:
    """ValueError for a name in the list ``key`` (``training.metrics``, ``eval.metrics``) that is not in
    :data:`METRICS`, or ``fid50k_full`` without reference statistics (``eval.ref_stats``)."""
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} in {key}; allowed: {', '.join(METRICS)}")
    if "fid50k_full" in metrics and not ref_stats:
        raise ValueError(
            f"{key} has fid50k_full but eval.ref_stats is not set (reference statistics, "
            "e.g. dataset-refs/img256.pkl or one made by scripts/ref_stats.py)"
        )


def check_reference_files(metrics: Sequence[str], net: TVMWrapper, ctx: MetricContext) -> None:
    """Read the reference statistics that ``metrics`` will use and check them against the images the
    network makes (exists, format, resolution when recorded), so that a wrong file is an error naming
    it when training starts rather than at its first evaluation, possibly hours later. Cheap: only the
    ``mu``/``sigma`` files (``fid50k_full``, ``fd_dinov2``) are read; networks are not loaded."""
    resolution = decoded_resolution(net, ctx.encoder)
    if "fid50k_full" in metrics and ctx.ref_stats:
        fid.load_ref_stats(ctx.ref_stats, expected_resolution=resolution)
    if "fd_dinov2" in metrics:
        fid.load_ref_stats(_dinov2_ref_path(ctx), expected_resolution=resolution, key="fd_dinov2")
