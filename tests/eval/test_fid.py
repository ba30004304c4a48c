"""FID pieces (docs/method.md §7): statistics, Fréchet distance, reference I/O, detector loading, sharding."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import runpy
import socket
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tvm.data.datasets import ImageFolderDataset
from tvm.eval.fid import (
    FeatureStats,
    RefStats,
    compute_fid,
    compute_reference_stats,
    frechet_distance,
    load_inception_detector,
    load_ref_stats,
    save_ref_stats,
)
from tvm.runtime.checkpoint import file_sha256

FEAT = 16
# The stand-in detector is TorchScript, the format NVIDIA ships, which recent torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning")


class _StandInDetector(torch.nn.Module):
    """Same call signature as the StyleGAN3 Inception: uint8 NCHW -> float32 [N, FEAT]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.proj = torch.nn.Linear(3 * 4 * 4, FEAT)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        x = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255.0, 4).flatten(1)
        feats = torch.tanh(self.proj(x))
        if return_features:
            return feats
        return feats.softmax(dim=1)


@pytest.fixture(scope="module")
def detector_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("det") / "inception-2015-12-05.pt"
    torch.jit.save(torch.jit.script(_StandInDetector()), str(path))
    return path


def _sample_images(indices: range, res: int = 8) -> torch.Tensor:
    """A generator seeded per sample index: image i depends on i only."""
    out = [
        torch.randint(0, 256, (3, res, res), generator=torch.Generator().manual_seed(1000 + i), dtype=torch.uint8)
        for i in indices
    ]
    return torch.stack(out)


def test_feature_stats_match_numpy() -> None:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((50, 5)).astype(np.float32) * 3 + 1
    stats = FeatureStats(5)
    stats.update(x[:20])
    part = FeatureStats(5)
    part.update(torch.from_numpy(x[20:]))
    stats.merge(part)
    mu, cov = stats.mean_cov(unbiased=True)
    np.testing.assert_allclose(mu, x.astype(np.float64).mean(0), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(x.astype(np.float64), rowvar=False, ddof=1), rtol=1e-10, atol=1e-12)
    _, biased = stats.mean_cov(unbiased=False)
    np.testing.assert_allclose(biased, np.cov(x.astype(np.float64), rowvar=False, ddof=0), rtol=1e-10, atol=1e-12)


def test_frechet_closed_forms() -> None:
    rng = np.random.default_rng(1)
    # Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2.
    a, b = rng.uniform(0.1, 4, 32), rng.uniform(0.1, 4, 32)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)
    # Identical Gaussians: 0. A shared rotation of both covariances does not change the distance.
    q, _ = np.linalg.qr(rng.standard_normal((32, 32)))
    assert frechet_distance(mu1, np.diag(a), mu1, np.diag(a)) == pytest.approx(0, abs=1e-9)
    rotated = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-8)


def test_frechet_matches_scipy_reference_and_self_is_zero() -> None:
    rng = np.random.default_rng(2)
    f1 = rng.standard_normal((300, 24)) @ rng.standard_normal((24, 24))
    f2 = rng.standard_normal((200, 24)) * 1.5 + 0.3
    s1, s2 = FeatureStats(24), FeatureStats(24)
    s1.update(f1)
    s2.update(f2)
    (m1, c1), (m2, c2) = s1.mean_cov(), s2.mean_cov()
    root = scipy.linalg.sqrtm(c1 @ c2).real
    reference = np.sum((m1 - m2) ** 2) + np.trace(c1 + c2 - 2 * root)
    assert frechet_distance(m1, c1, m2, c2) == pytest.approx(reference, rel=1e-12)
    assert abs(frechet_distance(m1, c1, m1, c1)) < 1e-8
    with pytest.raises(ValueError, match="shape"):
        frechet_distance(m1, c1, m2[:3], c2)


def test_ref_stats_round_trip_and_resolution_check(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    mu, sigma = rng.standard_normal(8), np.eye(8) * 2
    save_ref_stats(tmp_path / "ref.npz", RefStats(mu, sigma, num_images=10, resolution=256))
    ref = load_ref_stats(tmp_path / "ref.npz", expected_resolution=256)
    np.testing.assert_array_equal(ref.mu, mu)
    np.testing.assert_array_equal(ref.sigma, sigma)
    assert (ref.num_images, ref.resolution) == (10, 256)
    with pytest.raises(ValueError, match="resolution 256.*512"):
        load_ref_stats(tmp_path / "ref.npz", expected_resolution=512)
    # EDM .npz (mu, sigma only) and EDM2 pickle formats.
    np.savez(tmp_path / "edm.npz", mu=mu, sigma=sigma)
    assert load_ref_stats(tmp_path / "edm.npz", expected_resolution=512).resolution is None
    edm2 = {
        "fid": {"mu": mu, "sigma": sigma},
        "fd_dinov2": {"mu": mu[:4], "sigma": np.eye(4)},
        "num_images": np.int64(50),
    }
    for protocol in (2, 4, 5):
        (tmp_path / "img256.pkl").write_bytes(pickle.dumps(edm2, protocol=protocol))
        ref = load_ref_stats(tmp_path / "img256.pkl")
        np.testing.assert_array_equal(ref.mu, mu)
        assert ref.num_images == 50
    with pytest.raises(FileNotFoundError, match="absent.pkl"):
        load_ref_stats(tmp_path / "absent.pkl")
    np.savez(tmp_path / "bad.npz", mean=mu)
    with pytest.raises(ValueError, match=r"bad\.npz.*'mu' and 'sigma'"):
        load_ref_stats(tmp_path / "bad.npz")


class _Exploit:
    """Unpickling this would run os.system; the restricted unpickler must refuse it first."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_malicious_ref_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = {"fid": {"mu": np.zeros(2), "sigma": _Exploit(marker)}}
    path = tmp_path / "img256.pkl"
    path.write_bytes(pickle.dumps(payload))
    with pytest.raises(ValueError, match=r"img256\.pkl.*(posix|os)\.system.*not allowed"):
        load_ref_stats(path)
    assert not marker.exists()
    # A class global (not a callable reduce) is refused too.
    path.write_bytes(pickle.dumps({"fid": RefStats(np.zeros(2), np.eye(2))}))
    with pytest.raises(ValueError, match="RefStats is not allowed"):
        load_ref_stats(path)


def test_detector_loading_paths(tmp_path: Path, detector_file: Path) -> None:
    det = load_inception_detector(str(detector_file))
    images = _sample_images(range(4))
    feats = det(images, return_features=True)
    assert feats.shape == (4, FEAT) and feats.dtype == torch.float32
    torch.testing.assert_close(feats, _StandInDetector()(images, return_features=True))
    # A URL resolves to its cached copy, without any network access.
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / detector_file.name).write_bytes(detector_file.read_bytes())
    url = "https://example.invalid/metrics/inception-2015-12-05.pt"
    cached = load_inception_detector(url, cache_dir=cache, allow_download=False)
    torch.testing.assert_close(cached(images, return_features=True), feats)
    with pytest.raises(ValueError, match="sha256"):
        load_inception_detector(str(detector_file), sha256="0" * 64)
    digest = file_sha256(detector_file)
    assert digest == hashlib.sha256(detector_file.read_bytes()).hexdigest()
    load_inception_detector(str(detector_file), sha256=digest.upper())  # the expected digest's case is ignored


def test_missing_detector_error_says_where_to_put_it(tmp_path: Path) -> None:
    url = "https://api.ngc.nvidia.com/v2/models/nvidia/research/stylegan3/versions/1/files/metrics/inception-2015-12-05.pkl"
    with pytest.raises(FileNotFoundError) as info:
        load_inception_detector(url, cache_dir=tmp_path / "c", allow_download=False)
    assert str(tmp_path / "c" / "inception-2015-12-05.pkl") in str(info.value)
    # A download that fails (nothing listens on this port) gives the same guidance.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(FileNotFoundError, match="download failed.*place it at"):
        load_inception_detector(f"http://127.0.0.1:{port}/inception-2015-12-05.pt", cache_dir=tmp_path / "c", timeout=5)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_inception_detector(str(tmp_path / "nowhere.pt"))


def test_stylegan_pickle_needs_dnnlib(tmp_path: Path) -> None:
    path = tmp_path / "inception-2015-12-05.pkl"
    path.write_bytes(b"not reached")
    with pytest.raises(ImportError, match="dnnlib.*PYTHONPATH"):
        load_inception_detector(str(path))


def test_reference_stats_from_dataset(tmp_path: Path, detector_file: Path) -> None:
    imgs = _sample_images(range(12))
    path = tmp_path / "rgb.zip"
    with zipfile.ZipFile(path, "w") as z:
        for i, img in enumerate(imgs):
            buf = io.BytesIO()
            PIL.Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="png")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    det = load_inception_detector(str(detector_file))
    ref = compute_reference_stats(ImageFolderDataset(path, use_labels=False), det, batch_size=5, progress=False)
    feats = det(imgs, return_features=True).double().numpy()
    np.testing.assert_allclose(ref.mu, feats.mean(0), rtol=1e-6)
    np.testing.assert_allclose(ref.sigma, np.cov(feats, rowvar=False), rtol=1e-5, atol=1e-9)
    assert (ref.num_images, ref.resolution) == (12, 8)

    # The command-line wrapper writes the same statistics in our .npz format.
    script = runpy.run_path(str(Path(__file__).resolve().parents[2] / "scripts" / "ref_stats.py"), run_name="ref_stats")
    dest = tmp_path / "refs" / "rgb.npz"
    argv = [
        "--data",
        str(path),
        "--dest",
        str(dest),
        "--detector",
        str(detector_file),
        "--device",
        "cpu",
        "--workers",
        "0",
        "--batch",
        "5",
    ]
    assert script["main"](argv) == 0
    saved = load_ref_stats(dest, expected_resolution=8)
    np.testing.assert_allclose(saved.sigma, ref.sigma, rtol=1e-5, atol=1e-9)
    assert saved.num_images == 12


def test_fid_against_itself_and_exact_count(detector_file: Path) -> None:
    det = load_inception_detector(str(detector_file))
    calls: list[range] = []

    def generate(indices: range) -> torch.Tensor:
        calls.append(indices)
        return _sample_images(indices)

    feats = det(_sample_images(range(37)), return_features=True).double().numpy()
    ref = RefStats(feats.mean(0), np.cov(feats, rowvar=False))
    fid = compute_fid(generate, det, ref, num_images=37, batch_size=10, progress=False)
    assert abs(fid) < 1e-6
    assert sum(len(c) for c in calls) == 37 and max(len(c) for c in calls) == 10
    biased = compute_fid(generate, det, ref, num_images=37, batch_size=10, unbiased=False, progress=False)
    # Biased covariance = (N-1)/N of the unbiased one: FID = tr(S) (1 + a - 2 sqrt(a)), a = (N-1)/N.
    a = 36 / 37
    assert biased == pytest.approx(np.trace(ref.sigma) * (1 + a - 2 * np.sqrt(a)), rel=1e-5)
    with pytest.raises(ValueError, match="8px but the reference statistics are for 256px"):
        compute_fid(generate, det, RefStats(ref.mu, ref.sigma, resolution=256), num_images=4, progress=False)
    with pytest.raises(ValueError, match="uint8 images"):
        compute_fid(lambda r: _sample_images(r)[:1], det, ref, num_images=4, progress=False)


def _fid_worker(rank: int, world: int, port: int, detector: str, ref: RefStats, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        det = load_inception_detector(detector)
        fid = compute_fid(
            _sample_images, det, ref, num_images=23, batch_size=4, rank=rank, world_size=world, progress=False
        )
        Path(out, f"{rank}.txt").write_text(repr(fid))
    finally:
        dist.destroy_process_group()


def test_fid_independent_of_world_size(tmp_path: Path, detector_file: Path) -> None:
    det = load_inception_detector(str(detector_file))
    other = det(_sample_images(range(500, 540)), return_features=True).double().numpy()
    ref = RefStats(other.mean(0), np.cov(other, rowvar=False))
    single = compute_fid(_sample_images, det, ref, num_images=23, batch_size=4, progress=False)
    assert single > 1e-3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_fid_worker, args=(2, port, str(detector_file), ref, str(tmp_path)), nprocs=2)
    values = [float((tmp_path / f"{r}.txt").read_text()) for r in range(2)]
    # The same images, features gathered in sample order: equal up to float32 feature round-off
    # (the detector sees different batch compositions); another image set would move it by ~1e-2.
    assert values[0] == values[1]
    assert values[0] == pytest.approx(single, rel=1e-6)
