"""Optional sample-quality metrics: Inception Score, precision/recall, FD-DINOv2 (docs/method.md §7).

These complement FID (:mod:`tvm.eval.fid`) and run only where their networks are available
locally. The functions here are pure (arrays in, numbers out) apart from the loaders; the
registered metrics ``is50k``, ``pr50k3_full`` and ``fd_dinov2`` are in :mod:`tvm.eval.metrics`.

Inception Score (Salimans et al. 2016, "Improved Techniques for Training GANs", §4)::

    IS = exp( E_x KL( p(y|x) ‖ p(y) ) ),   p(y) = E_x p(y|x)

computed separately on ``splits`` consecutive parts of the generated set (p(y) is the marginal
of each part); the result is the mean and the (population) standard deviation of the ``splits``
scores, as reported since that paper (10 splits of 50,000 images).

Precision and recall (Kynkäänniemi et al. 2019, "Improved Precision and Recall Metric for
Assessing Generative Models", §2): each set Φ of feature vectors defines a manifold, the union of
balls ``B(φ, NN_k(φ, Φ))`` around its points whose radius is the distance from ``φ`` to its
``k``-th nearest neighbour in Φ (the point itself excluded; k = 3). Then::

    precision = (1/|Φ_g|) Σ_{φ ∈ Φ_g} 1[ φ ∈ manifold(Φ_r) ]
    recall    = (1/|Φ_r|) Σ_{φ ∈ Φ_r} 1[ φ ∈ manifold(Φ_g) ]

with ``φ ∈ manifold(Φ)`` iff ``‖φ − φ'‖ ≤ NN_k(φ', Φ)`` for some ``φ' ∈ Φ``. The paper (and
StyleGAN's ``pr50k3_full``) use VGG-16 fc2 features (4096-d); :func:`precision_recall` takes any
features, and ``pr50k3_full`` uses the detector named by ``eval.pr_detector_url``.

FD-DINOv2 (Stein et al. 2023, "Exposing flaws of generative model evaluation metrics and their
unfair treatment of diffusion models"; used by EDM2): the Fréchet distance of
:func:`tvm.eval.fid.frechet_distance` on the CLS-token features (1024-d) of DINOv2 ViT-L/14
(Oquab et al. 2023) instead of Inception pool features. Preprocessing, see :class:`DINOv2Detector`.
"""

from __future__ import annotations

import inspect
import io
import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from tvm.eval import fid
from tvm.progress import progress_bar

if TYPE_CHECKING:
    from tvm.runtime.build import ImageDataset

__all__ = [
    "inception_score",
    "detector_probabilities",
    "precision_recall",
    "RefFeatures",
    "save_ref_features",
    "load_ref_features",
    "compute_reference_features",
    "VGG16_URL",
    "DINOV2_HUB_REPO",
    "DINOV2_MODEL",
    "DINOV2_RESOLUTION",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "DINOv2Detector",
    "load_dinov2",
    "dinov2_features",
]

VGG16_URL = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/vgg16.pkl"
DINOV2_HUB_REPO = "facebookresearch/dinov2"
DINOV2_MODEL = "dinov2_vitl14"
DINOV2_RESOLUTION = 224
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------- Inception Score
def inception_score(probs: np.ndarray | torch.Tensor, splits: int = 10) -> tuple[float, float]:
    """Inception Score ``exp(E_x KL(p(y|x) ‖ p(y)))`` of class probabilities (module docstring).

    Args:
        probs: ``[N, K]`` rows ``p(y|x)`` (non-negative, each summing to 1), converted to float64.
        splits: the set is cut into ``splits`` consecutive parts ``probs[i·N//splits :
            (i+1)·N//splits]``; each part has its own marginal ``p(y)`` and score.

    Returns:
        ``(mean, std)`` of the per-split scores (``std`` with ``1/splits``, i.e. ``ddof=0``).
        Terms with ``p(y|x) = 0`` contribute 0 (``0·log 0 = 0``).
    """
    if isinstance(probs, torch.Tensor):
        probs = probs.detach().cpu().numpy()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"expected probabilities [N, K], got shape {list(p.shape)}")
    n = p.shape[0]
    if splits < 1 or n < splits:
        raise ValueError(f"need at least splits={splits} ≥ 1 rows, got {n}")
    if not np.isfinite(p).all() or (p < 0).any():
        raise ValueError("probabilities must be finite and non-negative")
    scores = []
    for i in range(splits):
        part = p[i * n // splits : (i + 1) * n // splits]
        marginal = part.mean(axis=0, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            terms = np.where(part > 0, part * (np.log(part) - np.log(marginal)), 0.0)
        scores.append(math.exp(terms.sum(axis=1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _accepts_keyword(fn: Callable[..., torch.Tensor], name: str) -> bool:
    """Whether ``fn`` (a module, TorchScript module or function) takes keyword ``name``."""
    forward = getattr(fn, "forward", fn)
    schema = getattr(forward, "schema", None)  # TorchScript methods
    if schema is not None:
        return any(arg.name == name for arg in schema.arguments)
    try:
        params = inspect.signature(forward).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def detector_probabilities(
    detector: Callable[..., torch.Tensor],
    images: torch.Tensor,
    device: torch.device | str = "cpu",
    output: str = "probs",
    atol: float = 1e-3,
) -> torch.Tensor:
    """Class probabilities ``float64 [N, K]`` of uint8 images ``[N, 3, H, W]`` from a detector.

    What the detector must support: ``detector(images, return_features=False)`` returning
    ``[N, K]`` class probabilities (``output="probs"``, rows ≥ 0 summing to 1 within ``atol``)
    or logits (``output="logits"``, softmax applied here in float64). The StyleGAN3 metrics
    Inception-v3 (``.pkl`` or TorchScript ``.pt``) returns softmax probabilities over its 1008 TF
    classes this way; when its ``forward`` takes a ``no_output_logits`` keyword (checked from the
    signature or TorchScript schema) it is passed ``no_output_logits=True`` as well, which leaves
    out the bias of the final layer as StyleGAN's ``is50k`` does.

    Raises:
        ValueError: the output is not ``[N, K]``, or (``output="probs"``) its rows are not
            probability vectors — e.g. a stand-in that returns features whatever
            ``return_features`` says cannot give an Inception Score.
    """
    if output not in ("probs", "logits"):
        raise ValueError(f"output must be 'probs' or 'logits', got {output!r}")
    images = fid._check_images(images, images.shape[0]).to(device)
    kwargs = {"return_features": False}
    if _accepts_keyword(detector, "no_output_logits"):
        kwargs["no_output_logits"] = True
    with torch.no_grad():
        out = detector(images, **kwargs)
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
        raise ValueError(
            f"the detector gave {getattr(out, 'shape', type(out))} for {images.shape[0]} images; "
            "the Inception Score needs [N, K] class probabilities "
            "from detector(images, return_features=False)"
        )
    out = out.detach().to(torch.float64)
    if output == "logits":
        return out.softmax(dim=1)
    sums = out.sum(dim=1)
    if not torch.isfinite(out).all() or (out < -atol).any() or ((sums - 1).abs() > atol).any():
        raise ValueError(
            "the detector cannot give class probabilities: detector(images, return_features=False) returned "
            f"values in [{out.min().item():.3g}, {out.max().item():.3g}] with row sums in "
            f"[{sums.min().item():.3g}, {sums.max().item():.3g}] (need rows ≥ 0 summing to 1). The Inception Score "
            "needs NVIDIA's StyleGAN3 Inception detector (eval.detector_url), which returns softmax probabilities "
            "when called with return_features=False."
        )
    return out.clamp_min(0)


# ---------------------------------------------------------------------------------- precision / recall
def _sq_dists(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``‖a_i − b_j‖²`` ``[len(a), len(b)]`` via ``‖a‖² + ‖b‖² − 2a·b``, clamped at 0."""
    d2 = (a * a).sum(1, keepdim=True) + (b * b).sum(1)[None, :] - 2 * (a @ b.T)
    return d2.clamp_min_(0)


def _kth_radii(x: torch.Tensor, k: int, batch: int) -> torch.Tensor:
    """Squared distance of each row of ``x`` to its ``k``-th nearest other row.

    Rows and columns are processed in ``batch × batch`` blocks, keeping the running ``k + 1``
    smallest squared distances per row (the row itself contributes exactly one 0), so memory is
    ``O(batch²)`` and the result is exact.
    """
    n = x.shape[0]
    out = torch.empty(n, dtype=x.dtype, device=x.device)
    for i in range(0, n, batch):
        rows = x[i : i + batch]
        best = torch.full((rows.shape[0], 0), math.inf, dtype=x.dtype, device=x.device)
        for j in range(0, n, batch):
            d2 = _sq_dists(rows, x[j : j + batch])
            lo, hi = max(i, j), min(i + rows.shape[0], j + d2.shape[1])
            if lo < hi:  # this block holds some rows' distance to themselves: exactly 0
                idx = torch.arange(lo, hi, device=x.device)
                d2[idx - i, idx - j] = 0
            best = torch.cat([best, d2], dim=1)
            best = best.topk(min(k + 1, best.shape[1]), dim=1, largest=False).values
        out[i : i + rows.shape[0]] = best[:, k]
    return out


def _covered(queries: torch.Tensor, points: torch.Tensor, radii2: torch.Tensor, batch: int) -> torch.Tensor:
    """Boolean ``[len(queries)]``: query within ``sqrt(radii2[j])`` of some ``points[j]``."""
    out = torch.zeros(queries.shape[0], dtype=torch.bool, device=queries.device)
    for i in range(0, queries.shape[0], batch):
        rows = queries[i : i + batch]
        hit = torch.zeros(rows.shape[0], dtype=torch.bool, device=queries.device)
        for j in range(0, points.shape[0], batch):
            hit |= (_sq_dists(rows, points[j : j + batch]) <= radii2[None, j : j + batch]).any(dim=1)
        out[i : i + rows.shape[0]] = hit
    return out


def precision_recall(
    real_feats: np.ndarray | torch.Tensor,
    gen_feats: np.ndarray | torch.Tensor,
    k: int = 3,
    batch: int = 4096,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> tuple[float, float]:
    """Improved precision and recall of Kynkäänniemi et al. 2019 (module docstring), exact.

    Args:
        real_feats: ``[N_r, D]`` reference features (N_r > k).
        gen_feats: ``[N_g, D]`` generated-image features (N_g > k), same detector.
        k: neighbourhood size (3 in the paper).
        batch: rows and columns per distance block; memory ``≈ batch² · itemsize`` per block
            (4096² float64 = 128 MiB), independent of N.
        device: where the distances are computed (default: the device of a tensor input, else CPU).
        dtype: float64 (default) or float32 arithmetic. Squared distances are computed as
            ``‖a‖² + ‖b‖² − 2a·b`` (clamped at 0), so in float32 points whose distance is within
            rounding of a radius may be classified either way.

    Returns:
        ``(precision, recall)`` in [0, 1]. Duplicate points count as neighbours at distance 0.
    """
    if device is None:
        device = real_feats.device if isinstance(real_feats, torch.Tensor) else "cpu"
    real = torch.as_tensor(real_feats).to(device=device, dtype=dtype)
    gen = torch.as_tensor(gen_feats).to(device=device, dtype=dtype)
    if real.ndim != 2 or gen.ndim != 2 or real.shape[1] != gen.shape[1]:
        raise ValueError(f"expected features [N_r, D] and [N_g, D], got {list(real.shape)} and {list(gen.shape)}")
    if k < 1 or min(real.shape[0], gen.shape[0]) <= k:
        raise ValueError(
            f"need more than k={k} ≥ 1 features per set, got {real.shape[0]} real and {gen.shape[0]} generated"
        )
    if batch < 1:
        raise ValueError(f"batch must be positive, got {batch}")
    with fid.tf32_disabled():
        real_r2 = _kth_radii(real, k, batch)
        gen_r2 = _kth_radii(gen, k, batch)
        precision = _covered(gen, real, real_r2, batch).to(torch.float64).mean().item()
        recall = _covered(real, gen, gen_r2, batch).to(torch.float64).mean().item()
    return float(precision), float(recall)


# ---------------------------------------------------------------------------------- reference features
@dataclass(frozen=True)
class RefFeatures:
    """Reference feature vectors ``float32 [N, D]`` for precision/recall (one row per real image)."""

    features: np.ndarray
    resolution: int | None = None
    detector: str | None = None


def save_ref_features(path: str | os.PathLike[str], ref: RefFeatures) -> None:
    """Write the reference-features format: ``.npz`` with ``features`` (float32 ``[N, D]``),
    ``num_images`` (int64), and where known ``resolution`` (int64) and ``detector`` (the URL or
    path of the network that produced them, a unicode string). No pickled objects."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: reference features are written as .npz")
    feats = np.asarray(ref.features, dtype=np.float32)
    if feats.ndim != 2:
        raise ValueError(f"features must be [N, D], got {list(feats.shape)}")
    arrays: dict[str, Any] = {"features": feats, "num_images": np.int64(feats.shape[0])}
    if ref.resolution is not None:
        arrays["resolution"] = np.int64(ref.resolution)
    if ref.detector is not None:
        arrays["detector"] = np.array(str(ref.detector))
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # numeric arrays only (no allow_pickle=: older numpy would store it as an array)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


def load_ref_features(path: str | os.PathLike[str], expected_resolution: int | None = None) -> RefFeatures:
    """Read :func:`save_ref_features`' ``.npz`` (``allow_pickle=False``); the resolution, when
    recorded and ``expected_resolution`` is given, must agree."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: reference features file does not exist (make it with scripts/ref_features.py)"
        )
    with np.load(path, allow_pickle=False) as z:
        if "features" not in z:
            raise ValueError(
                f"{path}: a reference-features .npz needs a 'features' [N, D] array, found {sorted(z.files)}"
            )
        feats = np.asarray(z["features"], dtype=np.float32)
        res = int(z["resolution"]) if "resolution" in z else None
        det = str(z["detector"]) if "detector" in z else None
    if feats.ndim != 2 or not np.isfinite(feats).all():
        raise ValueError(f"{path}: 'features' must be finite [N, D], got shape {list(feats.shape)}")
    if expected_resolution is not None and res is not None and res != expected_resolution:
        raise ValueError(f"{path}: reference features are for resolution {res}, the images are {expected_resolution}")
    return RefFeatures(feats, res, det)


@torch.no_grad()
def compute_reference_features(
    dataset: ImageDataset,
    detector: fid.Detector,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
    detector_name: str | None = None,
) -> RefFeatures:
    """Detector features of the first ``max_images`` (default all) images of an RGB uint8 dataset,
    in dataset order (``dataset[i] -> (uint8 [3, H, W], label)``), TF32 off."""
    if getattr(dataset, "is_npy", False):
        raise ValueError(
            f"{getattr(dataset, 'path', 'dataset')}: reference features need an RGB image dataset, not .npy latents"
        )
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(dataset, range(n)), batch_size=batch_size, shuffle=False, num_workers=num_workers
    )
    parts = []
    with fid.tf32_disabled():
        for images, _labels in progress_bar(loader, desc="reference features", unit="batch", disable=not progress):
            parts.append(fid.compute_features(detector, torch.as_tensor(images), device).cpu())
    if not parts:
        raise ValueError("dataset is empty")
    return RefFeatures(torch.cat(parts).numpy(), getattr(dataset, "resolution", None), detector_name)


# ---------------------------------------------------------------------------------- DINOv2
class DINOv2Detector(torch.nn.Module):
    """A DINOv2 backbone behind the Inception detector's call signature, for FD-DINOv2.

    ``detector(images uint8 [N, C, H, W] in [0, 255], return_features=True) -> float32 [N, D]``
    where, as in EDM2's FD-DINOv2: greyscale (C = 1) is tiled to RGB; pixels are scaled to
    [0, 1]; images are resized to ``resolution × resolution`` (224) with
    ``F.interpolate(mode="bicubic", antialias=True)`` whether up- or downsampling (torch's
    antialiased kernel is PIL's bicubic, a = −0.5, which EDM2's fast path uses to approximate its
    PIL reference resize; not clamped), skipped when already 224; normalised per channel with the
    ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225); and the backbone's output
    (the final-norm CLS token for the torch.hub DINOv2 models, 1024-d for ViT-L/14) is returned.
    The backbone must map float ``[N, 3, 224, 224]`` to ``[N, D]``.
    """

    mean: torch.Tensor  # buffers
    std: torch.Tensor

    def __init__(self, model: torch.nn.Module, resolution: int = DINOV2_RESOLUTION) -> None:
        super().__init__()
        self.model = model
        self.resolution = int(resolution)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[N, C, H, W]`` → normalised float32 ``[N, 3, 224, 224]``."""
        x = fid._check_images(images, images.shape[0]).to(self.mean.device, torch.float32) / 255
        if x.shape[-2:] != (self.resolution, self.resolution):
            x = F.interpolate(
                x, size=(self.resolution, self.resolution), mode="bicubic", align_corners=False, antialias=True
            )
        return (x - self.mean) / self.std

    @torch.no_grad()
    def forward(self, images: torch.Tensor, return_features: bool = True) -> torch.Tensor:
        if not return_features:
            raise ValueError("DINOv2 gives features only (return_features=True)")
        feats = self.model(self.preprocess(images))
        if not isinstance(feats, torch.Tensor) or feats.ndim != 2 or feats.shape[0] != images.shape[0]:
            raise ValueError(
                f"the DINOv2 model must return [N, D] features, got {getattr(feats, 'shape', type(feats))}"
            )
        return feats.to(torch.float32)


def dinov2_features(model: torch.nn.Module | DINOv2Detector, images: torch.Tensor) -> torch.Tensor:
    """DINOv2 features ``float32 [N, D]`` of uint8 images ``[N, 3, H, W]`` (preprocessing:
    :class:`DINOv2Detector`); ``model`` is a backbone or an already wrapped detector."""
    detector = model if isinstance(model, DINOv2Detector) else DINOv2Detector(model)
    return detector(images, return_features=True)


def _hub_cache_dir(hub_dir: str | os.PathLike[str] | None) -> Path:
    return Path(hub_dir) if hub_dir is not None else Path(torch.hub.get_dir())


def _is_hub_spec(source: str) -> bool:
    """``owner/repo[:ref]`` that is not an existing local path."""
    name = source.split(":")[0]
    return name.count("/") == 1 and not Path(source).expanduser().exists() and not source.startswith((".", "/", "~"))


def _weights_candidates(local_dir: Path, model_name: str, hub: Path) -> list[Path]:
    name = f"{model_name}_pretrain.pth"
    return [local_dir / name, hub / "checkpoints" / name]


def _load_hub_dir(
    local_dir: Path, model_name: str, weights: str | None, hub: Path, device: torch.device
) -> torch.nn.Module:
    """Build ``model_name`` from a local torch.hub checkout (its ``hubconf.py``) without pretrained
    download, then load a local state dict (``torch.load(weights_only=True)``, strict)."""
    candidates = [Path(weights).expanduser()] if weights else _weights_candidates(local_dir, model_name, hub)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise FileNotFoundError(
            f"DINOv2 weights for {model_name} not found at {' or '.join(map(str, candidates))}. Download "
            f"https://dl.fbaipublicfiles.com/dinov2/{model_name}/{model_name}_pretrain.pth on a machine with network "
            f"access and place it at {candidates[-1]} (or set eval.dinov2_weights to its path)."
        )
    model = torch.hub.load(str(local_dir), model_name, source="local", pretrained=False)
    state = torch.load(found, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device)


def load_dinov2(
    local_dir_or_hub_repo: str | os.PathLike[str] = DINOV2_HUB_REPO,
    device: torch.device | str = "cpu",
    model_name: str = DINOV2_MODEL,
    weights: str | os.PathLike[str] | None = None,
    allow_download: bool = False,
    hub_dir: str | os.PathLike[str] | None = None,
) -> DINOv2Detector:
    """Load DINOv2 (default ViT-L/14) from local files only, unless ``allow_download``.

    ``local_dir_or_hub_repo`` is one of:

    * a TorchScript file (e.g. a traced backbone mapping ``[N, 3, 224, 224]`` → ``[N, D]``),
      loaded with ``torch.jit.load``;
    * a local checkout of https://github.com/facebookresearch/dinov2 (a directory with
      ``hubconf.py``): ``model_name`` is built with ``pretrained=False`` and its weights are read
      from ``weights``, else ``<dir>/<model_name>_pretrain.pth``, else
      ``<hub_dir>/checkpoints/<model_name>_pretrain.pth`` (``hub_dir`` defaults to
      ``torch.hub.get_dir()``, i.e. ``$TORCH_HOME/hub``);
    * a torch.hub repository ``owner/repo[:ref]`` (default ``facebookresearch/dinov2``): its
      torch.hub cache ``<hub_dir>/<owner>_<repo>_<ref or main>`` is used as the local checkout
      above when present; otherwise, only with ``allow_download=True``, ``torch.hub.load`` fetches
      code and weights.

    Hub code is Python that runs on load: configure only sources you trust.

    Returns:
        :class:`DINOv2Detector` in eval mode, gradients off.

    Raises:
        FileNotFoundError: nothing usable is present locally and downloads are not allowed; the
            message says where to put the checkout and the weights.
    """
    device = torch.device(device)
    source = str(local_dir_or_hub_repo)
    hub = _hub_cache_dir(hub_dir)
    path = Path(source).expanduser()
    if path.is_file():
        if weights is not None:
            raise ValueError(
                f"{path}: a TorchScript DINOv2 file carries its own weights; do not also give weights={weights}"
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            try:
                model = torch.jit.load(str(path), map_location=device)
            except RuntimeError as e:
                raise ValueError(
                    f"{path}: not a TorchScript module ({e}). A DINOv2 state dict needs the model "
                    "code: give the dinov2 checkout directory and pass the .pth as the weights"
                ) from e
    elif path.is_dir():
        if not (path / "hubconf.py").is_file():
            raise FileNotFoundError(
                f"{path}: not a torch.hub checkout (no hubconf.py); clone "
                f"https://github.com/{DINOV2_HUB_REPO} there"
            )
        model = _load_hub_dir(path, model_name, None if weights is None else str(weights), hub, device)
    elif _is_hub_spec(source):
        repo, _, ref = source.partition(":")
        owner, name = repo.split("/")
        cached = hub / f"{owner}_{name}_{ref or 'main'}"
        if cached.is_dir() and (cached / "hubconf.py").is_file():
            model = _load_hub_dir(cached, model_name, None if weights is None else str(weights), hub, device)
        elif allow_download:
            model = torch.hub.load(source, model_name, pretrained=weights is None, trust_repo=True)
            if weights is not None:
                model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True), strict=True)
            model = model.to(device)
        else:
            weights_at = hub / "checkpoints" / f"{model_name}_pretrain.pth"
            raise FileNotFoundError(
                f"DINOv2 ({source}, {model_name}) is not available locally and downloads are disabled "
                f"(eval.dinov2_allow_download=false). On a machine with network access, clone "
                f"https://github.com/{repo} to {cached} and download "
                f"https://dl.fbaipublicfiles.com/dinov2/{model_name}/{model_name}_pretrain.pth to {weights_at} "
                f"(or set eval.dinov2 to a local checkout directory or a TorchScript file)."
            )
    else:
        raise FileNotFoundError(
            f"{source}: no such DINOv2 file or directory (expected a TorchScript file, a local "
            f"torch.hub checkout of {DINOV2_HUB_REPO}, or a hub repository name)"
        )
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return DINOv2Detector(model).to(device).eval()
