"""Optional metrics: Inception Score, precision/recall, FD-DINOv2 (tvm/eval/extra_metrics.py) and
their registered forms is50k, pr50k3_full, fd_dinov2 (tvm/eval/metrics.py)."""

from __future__ import annotations

import io
import math
import pickle
import runpy
import shutil
import textwrap
import zipfile
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import scipy.stats
import torch
from omegaconf import DictConfig, open_dict

from helpers import QUICK_TINY, evaluate_on_ranks
from tvm.config import compose_config
from tvm.data.datasets import ImageFolderDataset
from tvm.data.digits import DigitsDataset
from tvm.data.encoders import PixelEncoder
from tvm.eval import extra_metrics as em
from tvm.eval import fid, metrics
from tvm.eval.checkpoints import load_network_for_eval
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.eval.generate import generate_images, image_classes
from tvm.train.loop import run

FEATURES = 8
CLASSES = 5
DINO_DIM = 6
QUICK = QUICK_TINY + ["training.total_ticks=1", "training.ckpt_ticks=1"]

# Stand-in networks are TorchScript, the format NVIDIA ships, which recent torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning")


# ---------------------------------------------------------------------------------- stand-in networks
class ProbDetector(torch.nn.Module):
    """StyleGAN3 Inception call signature: features, or softmax probabilities (no output bias on request)."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.register_buffer("proj", torch.randn(3 * 4 * 4, FEATURES, generator=gen))
        self.register_buffer("out_w", torch.randn(FEATURES, CLASSES, generator=gen))
        self.register_buffer("out_b", torch.randn(CLASSES, generator=gen))

    def forward(self, x: torch.Tensor, return_features: bool = False, no_output_logits: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.adaptive_avg_pool2d(x.to(torch.float32) / 255.0, 4).flatten(1)
        feats = torch.tanh((pooled - 0.5) @ self.proj / 2)
        if return_features:
            return feats
        logits = 3 * feats @ self.out_w
        if not no_output_logits:
            logits = logits + self.out_b
        return logits.softmax(dim=1)


class NoBiasKeyword(torch.nn.Module):
    """Returns probabilities but has no ``no_output_logits`` keyword."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return torch.full((x.shape[0], 4), 0.25)


class FeaturesOnly(torch.nn.Module):
    """Ignores ``return_features`` (as test_evaluate's stand-in): cannot give an Inception Score."""

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return x.to(torch.float32).flatten(1)[:, :8] / 255 - 0.5


class TinyBackbone(torch.nn.Module):
    """Stands in for DINOv2 ViT-L/14: float [N, 3, 224, 224] → [N, DINO_DIM]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.head = torch.nn.Linear(3 * 7 * 7, DINO_DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224)
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 7).flatten(1))


HUBCONF = """
import torch

dependencies = ["torch"]


class TinyBackbone(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.head = torch.nn.Linear(3 * 7 * 7, {dim})

    def forward(self, x):
        return self.head(torch.nn.functional.adaptive_avg_pool2d(x, 7).flatten(1))


def dinov2_vitl14(*, pretrained=True, **kwargs):
    if pretrained:
        raise RuntimeError("this test must never fetch pretrained weights")
    return TinyBackbone()
"""


def write_hub_dir(folder: Path, with_weights: bool = True) -> TinyBackbone:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hubconf.py").write_text(textwrap.dedent(HUBCONF.format(dim=DINO_DIM)))
    backbone = TinyBackbone()
    if with_weights:
        torch.save(backbone.state_dict(), folder / "dinov2_vitl14_pretrain.pth")
    return backbone


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Stand-in detector and DINOv2 files, and digits reference features / statistics made with them."""
    folder = tmp_path_factory.mktemp("extra")
    out = {"detector": folder / "inception.pt", "dinov2": folder / "dinov2.pt"}
    torch.jit.save(torch.jit.script(ProbDetector()), str(out["detector"]))
    torch.jit.save(torch.jit.script(TinyBackbone()), str(out["dinov2"]))
    digits = DigitsDataset("train")
    det = fid.load_inception_detector(str(out["detector"]))
    out["ref_features"] = folder / "features.npz"
    em.save_ref_features(
        out["ref_features"],
        em.compute_reference_features(
            digits, det, batch_size=512, max_images=300, progress=False, detector_name="stand-in"
        ),
    )
    dino_ref = fid.compute_reference_stats(
        digits, em.load_dinov2(out["dinov2"]), batch_size=512, max_images=300, progress=False
    )
    out["dinov2_ref"] = folder / "dinov2.npz"
    fid.save_ref_stats(out["dinov2_ref"], dino_ref)
    out["edm2_pkl"] = folder / "img.pkl"  # EDM2 ref format: both entries in one pickle
    inc_ref = fid.compute_reference_stats(digits, det, batch_size=512, max_images=300, progress=False)
    with open(out["edm2_pkl"], "wb") as f:
        pickle.dump(
            {
                "fid": {"mu": inc_ref.mu, "sigma": inc_ref.sigma},
                "fd_dinov2": {"mu": dino_ref.mu, "sigma": dino_ref.sigma},
                "num_images": 300,
            },
            f,
        )
    return out


# ---------------------------------------------------------------------------------- Inception Score
def test_inception_score_closed_forms() -> None:
    mean, std = em.inception_score(np.full((40, 7), 1 / 7), splits=10)
    assert mean == pytest.approx(1.0, abs=1e-12) and std == pytest.approx(0.0, abs=1e-12)
    k = 8
    onehot = np.eye(k)[np.arange(10 * 4 * k) % k]  # every split holds each class 4 times
    mean, std = em.inception_score(torch.from_numpy(onehot), splits=10)
    assert mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0.0, abs=1e-9)
    # One split, one class: KL = 0 → 1.
    assert em.inception_score(np.eye(3)[[1, 1, 1]], splits=1)[0] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="splits"):
        em.inception_score(np.full((5, 3), 1 / 3), splits=10)
    with pytest.raises(ValueError, match="non-negative"):
        em.inception_score(np.array([[1.5, -0.5]] * 10), splits=1)


def test_inception_score_matches_scipy_entropy() -> None:
    rng = np.random.default_rng(0)
    p = rng.dirichlet(np.full(6, 0.3), size=103)
    scores = []
    for i in range(4):
        part = p[i * 103 // 4 : (i + 1) * 103 // 4]
        scores.append(np.exp(np.mean(scipy.stats.entropy(part.T, part.mean(0)[:, None]))))
    mean, std = em.inception_score(p, splits=4)
    assert mean == pytest.approx(np.mean(scores), rel=1e-12) and std == pytest.approx(np.std(scores), rel=1e-9)


def test_detector_probabilities(tmp_path: Path) -> None:
    images = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    det = ProbDetector()
    path = tmp_path / "det.pt"
    torch.jit.save(torch.jit.script(det), str(path))
    scripted = fid.load_inception_detector(str(path))
    probs = em.detector_probabilities(scripted, images)
    assert probs.dtype == torch.float64 and probs.shape == (5, CLASSES)
    torch.testing.assert_close(probs, det(images, return_features=False, no_output_logits=True).double())
    assert not torch.allclose(probs, det(images, return_features=False).double())  # bias left out
    # A detector without the no_output_logits keyword (TorchScript and plain modules).
    torch.jit.save(torch.jit.script(NoBiasKeyword()), str(tmp_path / "nokw.pt"))
    for nokw in (NoBiasKeyword(), fid.load_inception_detector(str(tmp_path / "nokw.pt"))):
        torch.testing.assert_close(
            em.detector_probabilities(nokw, images), torch.full((5, 4), 0.25, dtype=torch.float64)
        )
    with pytest.raises(ValueError, match="cannot give class probabilities"):
        em.detector_probabilities(FeaturesOnly(), images)
    logits = em.detector_probabilities(FeaturesOnly(), images, output="logits")
    torch.testing.assert_close(logits.sum(1), torch.ones(5, dtype=torch.float64))


# ---------------------------------------------------------------------------------- precision / recall
def brute_force_pr(real: np.ndarray, gen: np.ndarray, k: int) -> tuple[float, float]:
    def radii(x):
        d = np.sqrt(((x[:, None, :] - x[None, :, :]) ** 2).sum(-1))
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def covered(q, p, r):
        d = np.sqrt(((q[:, None, :] - p[None, :, :]) ** 2).sum(-1))
        return (d <= r[None, :]).any(1).mean()

    return covered(gen, real, radii(real)), covered(real, gen, radii(gen))


def test_precision_recall_known_answers() -> None:
    rng = np.random.default_rng(1)
    real = rng.standard_normal((60, 5))
    assert em.precision_recall(real, real.copy(), k=3, batch=7) == (1.0, 1.0)
    assert em.precision_recall(real, real + 1000.0, k=3) == (0.0, 0.0)
    # Two far clusters; the generator covers only the first (and is a subset of the real set).
    cluster_b = rng.standard_normal((40, 5)) + 100.0
    both = np.concatenate([real, cluster_b])
    precision, recall = em.precision_recall(both, real[:30], k=3, batch=16)
    assert precision == 1.0
    expected_recall = brute_force_pr(both, real[:30], 3)[1]
    assert recall == pytest.approx(expected_recall) and recall <= 60 / 100
    # Duplicates are neighbours at distance 0: 4 copies of each point give radius 0 with k = 3.
    dup = np.repeat(real[:10], 4, axis=0)
    assert em.precision_recall(dup, dup + 1e-3, k=3) == (0.0, 0.0)
    assert em.precision_recall(dup, dup.copy(), k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="more than k=3"):
        em.precision_recall(real[:3], real, k=3)
    with pytest.raises(ValueError, match="expected features"):
        em.precision_recall(real, real[:, :4])


@pytest.mark.parametrize("batch", [1000, 13, 64])
def test_precision_recall_matches_brute_force(batch: int) -> None:
    rng = np.random.default_rng(batch)
    real = rng.standard_normal((150, 6))
    gen = rng.standard_normal((110, 6)) * 1.3 + 0.4
    for k in (1, 3, 5):
        expected = brute_force_pr(real, gen, k)
        got = em.precision_recall(real, gen, k=k, batch=batch)
        assert got == pytest.approx(expected, abs=0), k
        assert 0 < min(got) and max(got) <= 1 and min(got) < 1
    got32 = em.precision_recall(
        torch.from_numpy(real).float(), torch.from_numpy(gen).float(), k=3, batch=batch, dtype=torch.float32
    )
    assert got32 == pytest.approx(brute_force_pr(real, gen, 3), abs=2 / 110)


def test_reference_features_round_trip(tmp_path: Path, files: dict[str, Path]) -> None:
    ref = em.load_ref_features(files["ref_features"])
    assert ref.features.shape == (300, FEATURES) and ref.features.dtype == np.float32 and ref.detector == "stand-in"
    det = fid.load_inception_detector(str(files["detector"]))
    first = fid.compute_features(det, torch.as_tensor(DigitsDataset("train").images[:4].copy()))
    np.testing.assert_array_equal(ref.features[:4], first.numpy())
    em.save_ref_features(tmp_path / "r.npz", em.RefFeatures(ref.features[:5], resolution=8))
    with pytest.raises(ValueError, match="resolution 8"):
        em.load_ref_features(tmp_path / "r.npz", expected_resolution=16)
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="'features'"):
        em.load_ref_features(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="ref_features.py"):
        em.load_ref_features(tmp_path / "absent.npz")


def test_ref_features_script(tmp_path: Path, files: dict[str, Path]) -> None:
    """scripts/ref_features.py: features for precision/recall, or DINOv2 statistics, of an RGB dataset."""
    images = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    data = tmp_path / "rgb.zip"
    with zipfile.ZipFile(data, "w") as z:
        for i, img in enumerate(images):
            buf = io.BytesIO()
            PIL.Image.fromarray(img.permute(1, 2, 0).numpy()).save(buf, format="png")
            z.writestr(f"00000/img{i:08d}.png", buf.getvalue())
    main = runpy.run_path(
        str(Path(__file__).resolve().parents[2] / "scripts" / "ref_features.py"), run_name="ref_features"
    )["main"]
    common = ["--data", str(data), "--device", "cpu", "--workers", "0", "--batch", "4"]
    assert main([*common, "--dest", str(tmp_path / "f.npz"), "--detector", str(files["detector"])]) == 0
    ref = em.load_ref_features(tmp_path / "f.npz", expected_resolution=8)
    det = fid.load_inception_detector(str(files["detector"]))
    np.testing.assert_allclose(ref.features, det(images, return_features=True).numpy(), rtol=1e-6, atol=1e-7)
    assert ref.detector == str(files["detector"])
    assert main([*common, "--dest", str(tmp_path / "d.npz"), "--dinov2", str(files["dinov2"])]) == 0
    stats = fid.load_ref_stats(tmp_path / "d.npz", expected_resolution=8)
    expected = fid.compute_reference_stats(
        ImageFolderDataset(data, use_labels=False), em.load_dinov2(files["dinov2"]), progress=False
    )
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-5, atol=1e-7)  # float32 batches of 4 vs 64
    assert stats.num_images == 9 and stats.mu.shape == (DINO_DIM,)


# ---------------------------------------------------------------------------------- DINOv2
def test_dinov2_preprocessing_and_torchscript_file(files: dict[str, Path]) -> None:
    model = em.load_dinov2(files["dinov2"])
    assert isinstance(model, em.DINOv2Detector) and not model.training
    images = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    x = torch.nn.functional.interpolate(images.float() / 255, size=(224, 224), mode="bicubic", antialias=True)
    x = (x - torch.tensor(em.IMAGENET_MEAN)[:, None, None]) / torch.tensor(em.IMAGENET_STD)[:, None, None]
    expected = TinyBackbone()(x)
    torch.testing.assert_close(em.dinov2_features(model, images), expected)
    torch.testing.assert_close(em.dinov2_features(TinyBackbone(), images), expected)
    # Greyscale is tiled to RGB; larger images are downsampled with antialiasing.
    grey = images[:, :1]
    torch.testing.assert_close(model(grey), model(grey.expand(-1, 3, -1, -1)))
    big = torch.randint(0, 256, (2, 3, 300, 300), dtype=torch.uint8)
    assert model(big).shape == (2, DINO_DIM)
    with pytest.raises(ValueError, match="features only"):
        model(images, return_features=False)


def test_dinov2_local_hub_directory(tmp_path: Path) -> None:
    backbone = write_hub_dir(tmp_path / "dinov2")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    loaded = em.load_dinov2(tmp_path / "dinov2", hub_dir=tmp_path / "hub")
    torch.testing.assert_close(loaded(images), em.dinov2_features(backbone, images))
    # Weights from the torch.hub checkpoints folder or an explicit file.
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    shutil.move(tmp_path / "dinov2" / "dinov2_vitl14_pretrain.pth", tmp_path / "hub" / "checkpoints")
    torch.testing.assert_close(em.load_dinov2(tmp_path / "dinov2", hub_dir=tmp_path / "hub")(images), loaded(images))
    shutil.move(tmp_path / "hub" / "checkpoints" / "dinov2_vitl14_pretrain.pth", tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match=r"place it at .*hub.checkpoints.dinov2_vitl14_pretrain\.pth"):
        em.load_dinov2(tmp_path / "dinov2", hub_dir=tmp_path / "hub")
    explicit = em.load_dinov2(tmp_path / "dinov2", weights=tmp_path / "w.pth", hub_dir=tmp_path / "hub")
    torch.testing.assert_close(explicit(images), loaded(images))


def test_dinov2_hub_repo_cache_and_missing_model_error(tmp_path: Path) -> None:
    hub = tmp_path / "hub"
    with pytest.raises(FileNotFoundError) as info:
        em.load_dinov2("facebookresearch/dinov2", hub_dir=hub)
    message = str(info.value)
    assert str(hub / "facebookresearch_dinov2_main") in message
    assert str(hub / "checkpoints" / "dinov2_vitl14_pretrain.pth") in message and "dinov2_allow_download" in message
    with pytest.raises(FileNotFoundError, match="no such DINOv2 file"):
        em.load_dinov2(tmp_path / "absent.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="hubconf.py"):
        em.load_dinov2(tmp_path / "empty")
    # The torch.hub cache layout is used without any network access.
    backbone = write_hub_dir(hub / "facebookresearch_dinov2_main")
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    torch.testing.assert_close(
        em.load_dinov2("facebookresearch/dinov2", hub_dir=hub)(images), em.dinov2_features(backbone, images)
    )


def test_edm2_pickle_fd_dinov2_entry(files: dict[str, Path], tmp_path: Path) -> None:
    ref = fid.load_ref_stats(files["edm2_pkl"], key="fd_dinov2")
    npz = fid.load_ref_stats(files["dinov2_ref"], key="fd_dinov2")
    np.testing.assert_array_equal(ref.mu, npz.mu)
    assert ref.mu.shape == (DINO_DIM,) and fid.load_ref_stats(files["edm2_pkl"]).mu.shape == (FEATURES,)
    with open(tmp_path / "fid_only.pkl", "wb") as f:
        pickle.dump({"fid": {"mu": np.zeros(2), "sigma": np.eye(2)}}, f)
    with pytest.raises(ValueError, match="'fd_dinov2'"):
        fid.load_ref_stats(tmp_path / "fid_only.pkl", key="fd_dinov2")


# ---------------------------------------------------------------------------------- registered metrics
@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("run")
    run(compose_config("tiny", QUICK + [f"run_dir={path}"]))
    (found,) = sorted(path.glob("checkpoint-*.pt"))
    return found


def extra_overrides(files: dict[str, Path]) -> list[str]:
    return [
        f"eval.detector_url={files['detector']}",
        f"eval.pr_detector_url={files['detector']}",
        f"eval.ref_features={files['ref_features']}",
        f"eval.dinov2={files['dinov2']}",
        f"eval.dinov2_ref_stats={files['dinov2_ref']}",
    ]


def eval_cfg(ckpt: Path, files: dict[str, Path], *extra: str) -> DictConfig:
    cfg = compose_config(
        "tiny",
        [
            f"eval.resume={ckpt}",
            "eval.num_images=20",
            "eval.batch_size=8",
            "eval.seed=3",
            "eval.metrics=[is50k,pr50k3_full,fd_dinov2]",
            *extra_overrides(files),
            *extra,
        ],
    )
    with open_dict(cfg):
        cfg.sampling = {"1_step": cfg.sampling["1_step"]}
    return cfg


def test_registered_metrics_end_to_end(ckpt: Path, files: dict[str, Path]) -> None:
    records = evaluate_checkpoints(eval_cfg(ckpt, files))
    results = {r["metric"]: r["results"] for r in records}
    assert set(results) == {"is50k", "pr50k3_full", "fd_dinov2"}
    # The same numbers by hand: 20 images seeded by index, uniform classes.
    net, _, _ = load_network_for_eval(ckpt)
    steps, cfg_scale = records[0]["num_steps"], records[0]["cfg_scale"]
    images = generate_images(
        net, PixelEncoder(), range(20), steps=steps, guidance=cfg_scale, seed=3, classes=image_classes(range(20), 10, 3)
    )
    det = fid.load_inception_detector(str(files["detector"]))
    mean, std = em.inception_score(em.detector_probabilities(det, images).float(), splits=10)
    assert results["is50k"] == pytest.approx({"is_mean": mean, "is_std": std}, rel=1e-9)
    assert 1 <= results["is50k"]["is_mean"] <= CLASSES
    precision, recall = em.precision_recall(
        em.load_ref_features(files["ref_features"]).features, fid.compute_features(det, images), k=3
    )
    assert results["pr50k3_full"] == {"precision": precision, "recall": recall}
    stats = fid.FeatureStats(DINO_DIM)
    stats.update(em.dinov2_features(em.load_dinov2(files["dinov2"]), images))
    ref = fid.load_ref_stats(files["dinov2_ref"])
    expected = fid.frechet_distance(*stats.mean_cov(unbiased=True), ref.mu, ref.sigma)
    # To rounding, not to the bit: the distance's matrix square root of the 20-image covariance (rank 19)
    # amplifies fp32 feature rounding; with scipy 1.17.1 (2026-12-07) the runs below differed by 5e-9 relative.
    assert results["fd_dinov2"]["fd_dinov2"] == pytest.approx(expected, rel=1e-6)
    # EDM2's pickle as eval.ref_stats supplies the 'fd_dinov2' entry when dinov2_ref_stats is unset.
    (edm2,) = evaluate_checkpoints(
        eval_cfg(
            ckpt, files, "eval.metrics=[fd_dinov2]", "eval.dinov2_ref_stats=null", f"eval.ref_stats={files['edm2_pkl']}"
        )
    )
    assert edm2["results"]["fd_dinov2"] == pytest.approx(expected, rel=1e-6)


def test_registered_metrics_configuration_errors(
    ckpt: Path, files: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ValueError, match="eval.ref_features"):
        evaluate_checkpoints(eval_cfg(ckpt, files, "eval.metrics=[pr50k3_full]", "eval.ref_features=null"))
    with pytest.raises(ValueError, match="eval.dinov2_ref_stats"):
        evaluate_checkpoints(eval_cfg(ckpt, files, "eval.metrics=[fd_dinov2]", "eval.dinov2_ref_stats=null"))
    # fd_dinov2 with the default hub repo and nothing cached: says where to put the files.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(FileNotFoundError, match=r"facebookresearch_dinov2_main"):
        evaluate_checkpoints(eval_cfg(ckpt, files, "eval.metrics=[fd_dinov2]", "eval.dinov2=facebookresearch/dinov2"))
    with pytest.raises(ValueError, match="at least 10 images"):
        evaluate_checkpoints(eval_cfg(ckpt, files, "eval.metrics=[is50k]", "eval.num_images=9"))
    # A features-only detector cannot give an Inception Score.
    feats_only = tmp_path / "features_only.pt"
    torch.jit.save(torch.jit.script(FeaturesOnly()), str(feats_only))
    with pytest.raises(ValueError, match="cannot give class probabilities"):
        evaluate_checkpoints(eval_cfg(ckpt, files, "eval.metrics=[is50k]", f"eval.detector_url={feats_only}"))
    assert {"is50k", "pr50k3_full", "fd_dinov2"} <= set(metrics.METRICS)


def test_two_ranks_give_the_one_rank_numbers(ckpt: Path, files: dict[str, Path], tmp_path: Path) -> None:
    """Sharding by image index: 2 gloo processes reproduce the 1-process numbers (uneven split: 21 images)."""
    shutil.copy(ckpt, tmp_path / ckpt.name)
    cfg = eval_cfg(tmp_path / ckpt.name, files, "eval.num_images=21", "eval.batch_size=6")
    one = evaluate_checkpoints(cfg)
    for two in evaluate_on_ranks(cfg, tmp_path):
        assert [r["metric"] for r in two] == [r["metric"] for r in one]
        assert [r["num_gpus"] for r in two] == [2, 2, 2] and [r["num_gpus"] for r in one] == [1, 1, 1]
        for a, b in zip(one, two):
            for key, value in a["results"].items():
                assert math.isfinite(value)
                assert b["results"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["metric"], key)
