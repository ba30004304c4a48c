"""Fréchet Inception Distance: detector loading, feature statistics, reference stats (docs/method.md §7).

FID between the Inception pool features of generated images ``g`` and real images ``r``::

    FID = ‖μ_g − μ_r‖² + tr(Σ_g + Σ_r − 2·(Σ_g Σ_r)^{1/2})

computed in float64 with ``scipy.linalg.sqrtm`` (real part), docs/method.md §7.1.

Covariances: both sides use the unbiased estimator ``(Σxxᵀ − N μμᵀ)/(N − 1)`` by default.
Upstream uses the biased ``/N`` for the generated set and EDM2's unbiased reference statistics
(docs/method.md §11 item 15); pass ``unbiased=False`` to :func:`compute_fid` to reproduce it (the difference
is ``O(tr Σ / N)``, ≈ 1e-3 FID at N = 50,000).

Detector trust: the Inception network is code as well as weights. It is loaded only from the
URL or path the caller configures (``eval.detector_url``), or from the cached copy of that URL
(``<cache_dir>/<file name of the URL>``); nothing else is searched. TorchScript ``.pt`` files
load with ``torch.jit.load``. The ``.pkl`` variant is a StyleGAN3 "persistent" pickle that
embeds Python source and executes it on load: it is unpickled only when StyleGAN3's ``dnnlib``
and ``torch_utils`` packages are importable (put a StyleGAN3 checkout on ``PYTHONPATH``), and
only from the configured source. Prefer the TorchScript ``.pt`` file where possible.

Inception Score, precision/recall and FD-DINOv2 live in :mod:`tvm.eval.extra_metrics`; they share
this module's sharded feature extraction (:func:`generated_features`) and the restricted
reference-pickle reader (``load_ref_stats(path, key='fd_dinov2')`` for EDM2's DINOv2 entry).
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import scipy.linalg
import torch

from tvm.progress import progress_bar
from tvm.runtime import distributed
from tvm.runtime.checkpoint import file_sha256

if TYPE_CHECKING:
    from tvm.runtime.build import ImageDataset

__all__ = [
    "INCEPTION_URL",
    "INCEPTION_PT_URL",
    "FEATURE_DIM",
    "load_inception_detector",
    "default_cache_dir",
    "FeatureStats",
    "frechet_distance",
    "RefStats",
    "load_ref_stats",
    "save_ref_stats",
    "compute_features",
    "compute_reference_stats",
    "compute_fid",
    "generated_features",
    "broadcast_value",
    "tf32_disabled",
]

INCEPTION_URL = (
    "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
)
INCEPTION_PT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
FEATURE_DIM = 2048

Detector = Callable[..., torch.Tensor]


# ---------------------------------------------------------------------------------- detector
def default_cache_dir() -> Path:
    """``$TVM_CACHE_DIR`` or ``~/.cache/tvm``; detector downloads go to its ``detectors/``."""
    return Path(os.environ.get("TVM_CACHE_DIR", Path.home() / ".cache" / "tvm"))


def _is_url(s: str) -> bool:
    return urllib.parse.urlparse(s).scheme in ("http", "https", "ftp")


def _download(url: str, dest: Path, timeout: float) -> None:
    """Download ``url`` to ``dest`` atomically (temporary file, then rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name + ".", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310
            shutil.copyfileobj(r, f)
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _resolve_detector_file(
    url_or_path: str, cache_dir: str | os.PathLike[str] | None, allow_download: bool, timeout: float
) -> Path:
    if not _is_url(url_or_path):
        path = Path(url_or_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{path}: detector file does not exist")
        return path
    name = Path(urllib.parse.urlparse(url_or_path).path).name
    cached = Path(cache_dir if cache_dir is not None else default_cache_dir() / "detectors") / name
    if cached.is_file():
        return cached
    reason = "downloads are disabled (allow_download=False)"
    if allow_download:
        try:
            _download(url_or_path, cached, timeout)
            return cached
        except (urllib.error.URLError, OSError, TimeoutError) as e:
            reason = f"download failed: {e}"
    raise FileNotFoundError(
        f"detector {url_or_path} is not available ({reason}). Download it on a machine with network "
        f"access and place it at {cached} (or set eval.detector_url to a local path)."
    )


def _load_persistent_pickle(path: Path, device: torch.device) -> Detector:
    try:
        import dnnlib  # noqa: F401
        import torch_utils  # noqa: F401
    except ImportError as e:
        raise ImportError(
            f"{path}: this StyleGAN3 pickle needs StyleGAN3's 'dnnlib' and 'torch_utils' packages to "
            f"unpickle (it executes embedded source code). Put a StyleGAN3 checkout on PYTHONPATH, or use "
            f"the TorchScript variant {INCEPTION_PT_URL}."
        ) from e
    with open(path, "rb") as f:
        detector = pickle.load(f)  # noqa: S301 - configured, trusted source (module docstring)
    return detector.to(device)


def load_inception_detector(
    url_or_path: str = INCEPTION_URL,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    allow_download: bool = True,
    timeout: float = 60.0,
    sha256: str | None = None,
) -> Detector:
    """Load the StyleGAN3 metrics Inception-v3 (or any module with its call signature).

    Called as ``detector(images uint8 [N, 3, H, W] in [0, 255], return_features=True)`` →
    ``float32 [N, 2048]`` pool features (it resizes to 299 internally).

    Args:
        url_or_path: a URL (``.pt`` TorchScript or ``.pkl`` StyleGAN3 pickle) or a local file.
        cache_dir: where a URL's file is cached (default ``default_cache_dir()/detectors``).
        device: where the detector runs.
        allow_download: download a URL missing from the cache.
        timeout: download timeout in seconds.
        sha256: optional hex digest the file must match.

    Raises:
        FileNotFoundError: the file is neither present nor downloadable; the message says where
            to put it.
    """
    device = torch.device(device)
    path = _resolve_detector_file(str(url_or_path), cache_dir, allow_download, timeout)
    if sha256 is not None:
        digest = file_sha256(path)
        if digest != sha256.lower():
            raise ValueError(f"{path}: sha256 {digest} does not match the expected {sha256}")
    if path.suffix == ".pkl":
        detector = _load_persistent_pickle(path, device)
    else:
        with warnings.catch_warnings():
            # TorchScript is deprecated in recent torch but is the format NVIDIA ships.
            warnings.simplefilter("ignore", DeprecationWarning)
            detector = torch.jit.load(str(path), map_location=device)
    if isinstance(detector, torch.nn.Module):
        detector.eval()
        for param in detector.parameters():
            param.requires_grad_(False)
    return detector


# ---------------------------------------------------------------------------------- statistics
class FeatureStats:
    """Running float64 moments of ``D``-dim features: ``n``, ``Σx`` ``[D]``, ``Σxxᵀ`` ``[D, D]``."""

    def __init__(self, dim: int) -> None:
        self.dim = int(dim)
        self.n = 0
        self.sum = np.zeros(self.dim, dtype=np.float64)
        self.sum_outer = np.zeros((self.dim, self.dim), dtype=np.float64)

    def update(self, features: np.ndarray | torch.Tensor) -> None:
        """Add ``[N, D]`` features (converted to float64 before any arithmetic)."""
        if isinstance(features, torch.Tensor):
            features = features.detach().cpu().numpy()
        x = np.asarray(features, dtype=np.float64)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise ValueError(f"expected features [N, {self.dim}], got {list(x.shape)}")
        self.n += x.shape[0]
        self.sum += x.sum(axis=0)
        self.sum_outer += x.T @ x

    def merge(self, other: FeatureStats) -> None:
        """Add another accumulator's moments."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge {other.dim}-dim stats into {self.dim}-dim stats")
        self.n += other.n
        self.sum += other.sum
        self.sum_outer += other.sum_outer

    def mean_cov(self, unbiased: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``μ = Σx/N`` and ``Σ = (Σxxᵀ − N μμᵀ)/(N − 1)`` (or ``/N`` when not unbiased)."""
        if self.n < (2 if unbiased else 1):
            raise ValueError(f"need at least {2 if unbiased else 1} features, have {self.n}")
        mu = self.sum / self.n
        centered = self.sum_outer - self.n * np.outer(mu, mu)
        return mu, centered / (self.n - 1 if unbiased else self.n)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """``‖μ1 − μ2‖² + tr(Σ1 + Σ2 − 2·Re sqrtm(Σ1 Σ2))`` in float64 (docs/method.md §7.1)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    d = mu1.shape[0]
    if mu1.shape != (d,) or mu2.shape != (d,) or s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"shape mismatch: mu {mu1.shape} / {mu2.shape}, sigma {s1.shape} / {s2.shape}")
    root = scipy.linalg.sqrtm(s1 @ s2)
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(root)))


# ---------------------------------------------------------------------------------- reference stats
@dataclass(frozen=True)
class RefStats:
    """Reference feature statistics: ``mu [D]``, ``sigma [D, D]`` (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    resolution: int | None = None


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickler that reconstructs only numpy arrays, dtypes and scalars (plus builtin containers).

    Any other global (``os.system``, ``builtins.eval``, a class, …) raises ``UnpicklingError``
    before anything is called.
    """

    _ALLOWED = frozenset(
        {
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a reference-statistics pickle")


def _ref_from_pickle(path: Path, key: str = "fid") -> RefStats:
    with open(path, "rb") as f:
        try:
            data = _NumpyOnlyUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ImportError, IndexError) as e:
            raise ValueError(f"{path}: refused or invalid reference-statistics pickle: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict, got {type(data).__name__}")
    fid = data.get(key, data if key == "fid" else None)
    if not isinstance(fid, dict) or "mu" not in fid or "sigma" not in fid:
        raise ValueError(f"{path}: no '{key}': {{'mu', 'sigma'}} entry (EDM2 calculate_metrics ref format)")
    num = data.get("num_images")
    res = data.get("resolution")
    return RefStats(fid["mu"], fid["sigma"], None if num is None else int(num), None if res is None else int(res))


def _ref_from_npz(path: Path) -> RefStats:
    with np.load(path, allow_pickle=False) as z:
        if "mu" not in z or "sigma" not in z:
            raise ValueError(f"{path}: .npz reference statistics need 'mu' and 'sigma' arrays, found {sorted(z.files)}")
        num = int(z["num_images"]) if "num_images" in z else None
        res = int(z["resolution"]) if "resolution" in z else None
        return RefStats(z["mu"], z["sigma"], num, res)


def load_ref_stats(path: str | os.PathLike[str], expected_resolution: int | None = None, key: str = "fid") -> RefStats:
    """Read reference statistics: EDM2 ``.pkl`` (``{'fid': {'mu', 'sigma'}, ...}``) or ``.npz``.

    Pickles are read with a numpy-only unpickler (no arbitrary globals); ``key`` names the entry
    (``'fid'``, or ``'fd_dinov2'`` for EDM2's DINOv2 statistics; a pickle without a ``'fid'`` key
    is read as the bare ``{'mu', 'sigma'}`` dict). An ``.npz`` holds one set of statistics and
    ``key`` is ignored. When the file records its resolution and ``expected_resolution`` is
    given, they must agree.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: reference statistics file does not exist")
    if path.suffix == ".npz":
        ref = _ref_from_npz(path)
    else:
        ref = _ref_from_pickle(path, key)
    mu = np.asarray(ref.mu, dtype=np.float64)
    sigma = np.asarray(ref.sigma, dtype=np.float64)
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{path}: mu {list(mu.shape)} and sigma {list(sigma.shape)} are not [D] and [D, D]")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: non-finite values in mu or sigma")
    if expected_resolution is not None and ref.resolution is not None and ref.resolution != expected_resolution:
        raise ValueError(
            f"{path}: reference statistics are for resolution {ref.resolution}, the images are {expected_resolution}"
        )
    return RefStats(mu, sigma, ref.num_images, ref.resolution)


def save_ref_stats(path: str | os.PathLike[str], ref: RefStats) -> None:
    """Write our reference format: ``.npz`` with ``mu``, ``sigma``, ``num_images``, ``resolution``."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"{path}: reference statistics are written as .npz")
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, Any] = {"mu": np.asarray(ref.mu, np.float64), "sigma": np.asarray(ref.sigma, np.float64)}
    if ref.num_images is not None:
        arrays["num_images"] = np.int64(ref.num_images)
    if ref.resolution is not None:
        arrays["resolution"] = np.int64(ref.resolution)
    buf = io.BytesIO()
    np.savez(buf, **arrays)  # numeric arrays only (no allow_pickle=: older numpy would store it as an array)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------- feature extraction
@contextlib.contextmanager
def tf32_disabled() -> Iterator[None]:
    """Turn TF32 matmul/cuDNN off inside the block (restored afterwards)."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn


def _check_images(images: torch.Tensor, n: int) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        raise ValueError(f"images must be a uint8 tensor, got {getattr(images, 'dtype', type(images))}")
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] != n:
        raise ValueError(f"expected uint8 images [{n}, 3, H, W], got {list(images.shape)}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


@torch.no_grad()
def compute_features(detector: Detector, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Detector features of uint8 ``[N, 3, H, W]`` images → float32 ``[N, D]`` (greyscale tiled to RGB)."""
    images = _check_images(images, images.shape[0]).to(device)
    return detector(images, return_features=True).to(torch.float32)


def compute_reference_stats(
    dataset: ImageDataset,
    detector: Detector,
    batch_size: int = 64,
    max_images: int | None = None,
    device: torch.device | str = "cpu",
    num_workers: int = 0,
    progress: bool = True,
) -> RefStats:
    """Reference statistics (unbiased covariance) of an RGB uint8 dataset, in dataset order, on
    one process (the reference set is computed once and saved with :func:`save_ref_stats`).

    ``dataset[i] -> (uint8 [3, H, W], label)`` as :class:`~tvm.data.datasets.ImageFolderDataset`;
    a latent (``.npy``) dataset is rejected because its arrays are not images.
    """
    if getattr(dataset, "is_npy", False):
        raise ValueError(
            f"{getattr(dataset, 'path', 'dataset')}: reference statistics need an RGB image dataset, not .npy latents"
        )
    n = len(dataset) if max_images is None else min(max_images, len(dataset))
    subset = torch.utils.data.Subset(dataset, range(n))
    loader = torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    stats: FeatureStats | None = None
    with tf32_disabled():
        for images, _labels in progress_bar(loader, desc="reference features", unit="batch", disable=not progress):
            feats = compute_features(detector, torch.as_tensor(images), device)
            stats = stats or FeatureStats(feats.shape[1])
            stats.update(feats)
    if stats is None:
        raise ValueError("dataset is empty")
    mu, sigma = stats.mean_cov(unbiased=True)
    return RefStats(mu, sigma, stats.n, getattr(dataset, "resolution", None))


def generated_features(
    generate: Callable[[range], torch.Tensor],
    features: Callable[[torch.Tensor], torch.Tensor],
    num_images: int,
    batch_size: int = 128,
    rank: int = 0,
    world_size: int = 1,
    expected_resolution: int | None = None,
    progress: bool = True,
    desc: str = "features",
) -> torch.Tensor | None:
    """Per-image outputs of ``features`` on ``num_images`` generated images, sharded over ranks.

    Rank ``r`` of ``W`` handles the sample indices ``i ≡ r (mod W)``, calling
    ``generate(range(start, stop, W)) -> uint8 [len(range), 3, H, W]`` per batch of at most
    ``batch_size`` indices, then ``features(images) -> [len(range), D]``. The rows are gathered
    to rank 0 in sample-index order (float32 ``[num_images, D]`` on the CPU); other ranks get
    ``None``. TF32 is off inside. With ``torch.distributed`` initialised all ranks must call it.
    Shared by FID, FD-DINOv2, Inception Score and precision/recall (:mod:`tvm.eval.extra_metrics`).
    """
    if num_images < max(1, world_size):
        raise ValueError(f"num_images must be at least max(1, world_size={world_size}), got {num_images}")
    indices = range(rank, num_images, world_size)
    chunks = [indices[k : k + batch_size] for k in range(0, len(indices), batch_size)]
    feats: list[torch.Tensor] = []
    with tf32_disabled():
        for chunk in progress_bar(chunks, desc=desc, unit="batch", disable=not progress or rank != 0):
            images = _check_images(generate(chunk), len(chunk))
            if expected_resolution is not None and images.shape[-1] != expected_resolution:
                raise ValueError(
                    f"generated images are {images.shape[-1]}px but the reference statistics are for "
                    f"{expected_resolution}px"
                )
            feats.append(features(images).to(torch.float32))
    local = torch.cat(feats)
    return distributed.gather_interleaved(local, num_images, dst=0) if world_size > 1 else local


def broadcast_value(value: float | None, rank: int, world_size: int) -> float:
    """Rank 0's ``value`` as a float on every rank (others pass ``None``; NaN when rank 0 has none)."""
    if world_size > 1:
        value = distributed.broadcast_object(value if rank == 0 else None)
    return float("nan") if value is None else float(value)


def compute_fid(
    generate: Callable[[range], torch.Tensor],
    detector: Detector,
    ref: RefStats,
    num_images: int = 50_000,
    batch_size: int = 128,
    rank: int = 0,
    world_size: int = 1,
    device: torch.device | str = "cpu",
    unbiased: bool = True,
    progress: bool = True,
) -> float:
    """FID of a generator against reference statistics, sharded over ranks (docs/method.md §7.1).

    Rank ``r`` of ``W`` handles the sample indices ``i ≡ r (mod W)``, calling
    ``generate(range(start, stop, W)) -> uint8 [len(range), 3, H, W]`` per batch of at most
    ``batch_size`` indices; ``generate`` must seed each sample by its index (not by rank) so the
    image set is independent of ``W``. Features are gathered to rank 0 in sample-index order, so
    the statistics use exactly ``num_images`` features accumulated in the same order for any
    ``W`` (:func:`generated_features`). TF32 is off inside. With ``torch.distributed``
    initialised, all ranks must call this and all return the same value (broadcast from rank 0).

    Any detector with the Inception call signature works, e.g. the DINOv2 wrapper of
    :mod:`tvm.eval.extra_metrics` for FD-DINOv2.

    Args:
        unbiased: generated-set covariance with ``N − 1`` (default; upstream used ``N``).
    """
    if num_images < max(2, world_size):
        raise ValueError(f"num_images must be at least max(2, world_size={world_size}), got {num_images}")
    gathered = generated_features(
        generate,
        lambda images: compute_features(detector, images, device),
        num_images,
        batch_size,
        rank,
        world_size,
        expected_resolution=ref.resolution,
        progress=progress,
        desc="FID features",
    )
    value = None
    if gathered is not None:
        stats = FeatureStats(gathered.shape[1])
        stats.update(gathered)
        mu, sigma = stats.mean_cov(unbiased=unbiased)
        value = frechet_distance(mu, sigma, ref.mu, ref.sigma)
    return broadcast_value(value, rank, world_size)
