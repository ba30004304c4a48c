"""Checkpoint evaluation: eval.py's library (docs/method.md §7.2, §11 items 11, 15) and fid50k_full (§7.1)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import runpy
import shutil
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import DictConfig, open_dict

from helpers import QUICK_TINY, evaluate_on_ranks
from tvm.config import compose_config
from tvm.data.digits import DigitsDataset
from tvm.data.encoders import PixelEncoder
from tvm.eval import fid
from tvm.eval.checkpoints import load_network_for_eval
from tvm.eval.evaluate import RESULTS_FILE, evaluate_checkpoints
from tvm.eval.generate import generate_images, image_classes
from tvm.eval.metrics import MetricContext
from tvm.runtime.checkpoint import CheckpointError
from tvm.train.loop import run

ROOT = Path(__file__).resolve().parents[2]
QUICK = QUICK_TINY + ["training.total_ticks=2", "training.ckpt_ticks=1"]
FIELDS = {
    "checkpoint",
    "step",
    "sampler",
    "num_steps",
    "cfg_scale",
    "fp8",
    "metric",
    "results",
    "num_images",
    "num_gpus",
    "seconds",
    "timestamp",
}
FEATURES = 8  # the real detector gives 2048; scipy's sqrtm of a 2048×2048 matrix takes ~1 min on 2 cores

# The stand-in detector is TorchScript, the format NVIDIA ships, which recent torch deprecates.
pytestmark = pytest.mark.filterwarnings("ignore:`torch\\.jit:DeprecationWarning")


class StandInDetector(torch.nn.Module):
    """The Inception call signature: uint8 ``[N, 3, H, W]``, ``return_features=True`` → ``[N, FEATURES]``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("proj", torch.randn(3 * 8 * 8, FEATURES, generator=torch.Generator().manual_seed(0)))

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        pooled = torch.nn.functional.interpolate(x.to(torch.float32) / 255.0, size=(8, 8), mode="area")
        return torch.tanh((pooled.flatten(1) - 0.5) @ self.proj / 4)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny digits run with checkpoints at steps 2 and 4."""
    path = tmp_path_factory.mktemp("run")
    run(compose_config("tiny", QUICK + [f"run_dir={path}"]))
    return path


@pytest.fixture(scope="module")
def fid_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A TorchScript stand-in detector and the digits' reference statistics computed with it."""
    folder = tmp_path_factory.mktemp("fid")
    detector_path = folder / "detector.pt"
    torch.jit.save(torch.jit.script(StandInDetector()), str(detector_path))
    ref = fid.compute_reference_stats(
        DigitsDataset("train"), fid.load_inception_detector(str(detector_path)), batch_size=512, progress=False
    )
    fid.save_ref_stats(folder / "ref.npz", ref)
    return detector_path, folder / "ref.npz"


def only_samplers(cfg: DictConfig, *names: str) -> DictConfig:
    """Keep the named samplers (Hydra's override grammar cannot address keys such as ``2_step``)."""
    with open_dict(cfg):
        cfg.sampling = {name: cfg.sampling[name] for name in names}
    return cfg


def eval_config(resume: Path, *extra: str, samplers: tuple[str, ...] = ("1_step", "2_step", "4_step")) -> DictConfig:
    cfg = compose_config("tiny", [f"eval.resume={resume}", "eval.num_images=16", "eval.batch_size=8", *extra])
    return only_samplers(cfg, *samplers)


def fid_overrides(fid_files: tuple[Path, Path]) -> list[str]:
    return ["eval.metrics=[fid50k_full]", f"eval.detector_url={fid_files[0]}", f"eval.ref_stats={fid_files[1]}"]


def read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_run_directory_newest_first_appends_jsonl(run_dir: Path) -> None:
    before = read_lines(run_dir / RESULTS_FILE)
    records = evaluate_checkpoints(eval_config(run_dir, "eval.metrics=[digits]"))
    assert [(r["step"], r["sampler"]) for r in records] == [
        (4, "1_step"),
        (4, "2_step"),
        (4, "4_step"),
        (2, "1_step"),
        (2, "2_step"),
        (2, "4_step"),
    ]
    for record in records:
        assert record.keys() == FIELDS
        assert record["metric"] == "digits" and record["num_gpus"] == 1 and record["cfg_scale"] == 2.5
        assert set(record["results"]) == {"frechet", "accuracy"} and math.isfinite(record["results"]["frechet"])
    assert Path(records[0]["checkpoint"]).name == "checkpoint-00000004.pt"
    assert read_lines(run_dir / RESULTS_FILE) == before + records

    single = evaluate_checkpoints(
        eval_config(run_dir / "checkpoint-00000002.pt", "eval.metrics=[digits]", samplers=("1_step",))
    )
    assert [(r["step"], r["sampler"]) for r in single] == [(2, "1_step")]
    assert single[0]["results"] == records[3]["results"]
    assert read_lines(run_dir / RESULTS_FILE) == before + records + single
    assert not any(r["fp8"] for r in records + single)


def test_fp8_sampling_is_recorded_and_measured(run_dir: Path, monkeypatch) -> None:
    """``eval.fp8=true`` measures the network with FP8 GEMMs in its blocks and says so in the records."""
    import tvm.eval.evaluate as evaluate

    quantized = []
    compute = evaluate.compute_metric

    def spy(metric, net, *args):
        quantized.append(net.model.fp8)
        return compute(metric, net, *args)

    monkeypatch.setattr(evaluate, "compute_metric", spy)
    checkpoint = run_dir / "checkpoint-00000004.pt"
    plain = evaluate_checkpoints(eval_config(checkpoint, "eval.metrics=[digits]", samplers=("1_step",)))
    fp8 = evaluate_checkpoints(eval_config(checkpoint, "eval.metrics=[digits]", "eval.fp8=true", samplers=("1_step",)))
    assert quantized == [False, True]
    assert [r["fp8"] for r in plain] == [False] and [r["fp8"] for r in fp8] == [True]
    assert math.isfinite(fp8[0]["results"]["frechet"])


def test_fid_with_stand_in_detector_end_to_end(run_dir: Path, fid_files: tuple[Path, Path]) -> None:
    ckpt = run_dir / "checkpoint-00000004.pt"
    (record,) = evaluate_checkpoints(eval_config(ckpt, *fid_overrides(fid_files), "eval.seed=3", samplers=("2_step",)))
    assert record["metric"] == "fid50k_full" and record["num_steps"] == 2
    # The same number by hand: 16 images seeded by index, uniform classes, unbiased covariance.
    net, _, _ = load_network_for_eval(ckpt)
    images = generate_images(
        net, PixelEncoder(), range(16), steps=2, guidance=2.5, seed=3, classes=image_classes(range(16), 10, 3)
    )
    stats = fid.FeatureStats(FEATURES)
    stats.update(fid.compute_features(fid.load_inception_detector(str(fid_files[0])), images))
    ref = fid.load_ref_stats(fid_files[1])
    expected = fid.frechet_distance(*stats.mean_cov(unbiased=True), ref.mu, ref.sigma)
    assert record["results"]["fid"] == pytest.approx(expected, rel=1e-9)

    (empirical,) = evaluate_checkpoints(
        eval_config(ckpt, *fid_overrides(fid_files), "eval.seed=3", "eval.label_mode=empirical", samplers=("2_step",))
    )
    assert math.isfinite(empirical["results"]["fid"])


def test_two_ranks_give_the_one_rank_numbers(run_dir: Path, fid_files: tuple[Path, Path], tmp_path: Path) -> None:
    """Sharding by image index: 2 processes (gloo) reproduce the 1-process metrics, uneven split included."""
    shutil.copy(run_dir / "checkpoint-00000004.pt", tmp_path / "checkpoint-00000004.pt")
    overrides = [
        f"eval.resume={tmp_path / 'checkpoint-00000004.pt'}",
        "eval.num_images=15",
        "eval.batch_size=6",
        "eval.metrics=[digits,fid50k_full]",
        f"eval.detector_url={fid_files[0]}",
        f"eval.ref_stats={fid_files[1]}",
    ]
    one = evaluate_checkpoints(only_samplers(compose_config("tiny", overrides), "1_step"))
    for two in evaluate_on_ranks(only_samplers(compose_config("tiny", overrides), "1_step"), tmp_path):
        assert [r["num_gpus"] for r in two] == [2, 2]
        for a, b in zip(one, two):
            assert a["metric"] == b["metric"]
            for key, value in a["results"].items():
                assert b["results"][key] == pytest.approx(value, rel=1e-6, abs=1e-9), (a["metric"], key)
    assert len(read_lines(tmp_path / RESULTS_FILE)) == 4  # 2 lines per run, written by rank 0 only


def test_configuration_errors(run_dir: Path, fid_files: tuple[Path, Path], tmp_path: Path, monkeypatch) -> None:
    ckpt = run_dir / "checkpoint-00000002.pt"
    with pytest.raises(ValueError, match="eval.ref_stats"):
        evaluate_checkpoints(eval_config(ckpt, "eval.metrics=[fid50k_full]"))
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate_checkpoints(eval_config(ckpt, "eval.metrics=[fid10k]"))
    with pytest.raises(ValueError, match="eval.resume is not set"):
        evaluate_checkpoints(compose_config("tiny"))
    missing = tmp_path / "inception.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        evaluate_checkpoints(eval_config(ckpt, *fid_overrides(fid_files), f"eval.detector_url={missing}"))

    def offline(url: str, dest: Path, timeout: float) -> None:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fid, "_download", offline)
    monkeypatch.setenv("TVM_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="place it at .*cache.detectors.inception-2015-12-05.pkl"):
        evaluate_checkpoints(eval_config(ckpt, *fid_overrides(fid_files), f"eval.detector_url={fid.INCEPTION_URL}"))


def test_metric_context_from_config() -> None:
    """One constructor for the loop and eval.py: per-rank batch ceil(eval.batch_size / W), the eval
    section's settings, and float64 label frequencies for label_mode=empirical."""
    cfg = compose_config(
        "tiny", ["eval.batch_size=10", "eval.num_images=30", "eval.seed=4", "eval.dinov2_ref_stats=stats.npz"]
    )
    encoder = PixelEncoder()
    sizes = [MetricContext.from_config(cfg, encoder, torch.device("cpu"), w).batch_size for w in (1, 2, 3, 4, 11)]
    assert sizes == [10, 5, 4, 3, 1]
    ctx = MetricContext.from_config(cfg, encoder, torch.device("cpu"), 1)
    assert (ctx.encoder, ctx.seed, ctx.num_images, ctx.label_mode, ctx.class_probs) == (encoder, 4, 30, "uniform", None)
    assert ctx.dinov2_ref_stats == "stats.npz" and ctx.ref_features is None
    cfg.eval.label_mode = "empirical"
    dataset = DigitsDataset("train")
    probs = MetricContext.from_config(cfg, encoder, torch.device("cpu"), 1, dataset).class_probs
    counts = np.bincount(dataset.targets, minlength=10).astype(np.float64)
    assert probs.dtype == np.float64 and np.array_equal(probs, counts / counts.sum())
    assert np.array_equal(MetricContext.from_config(cfg, encoder, torch.device("cpu"), 1).class_probs, probs)


def test_unreadable_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint-00000009.pt"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=str(bad)):
        evaluate_checkpoints(eval_config(tmp_path, "eval.metrics=[digits]"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        evaluate_checkpoints(eval_config(tmp_path / "absent", "eval.metrics=[digits]"))


def _run_eval_py(argv: list[str], stderr_path: str) -> None:
    """``python eval.py ARGV`` in a forked process (no interpreter start-up), stderr to a file,
    run from the file's folder (Hydra writes its ``eval.log`` into the working directory)."""
    os.chdir(Path(stderr_path).parent)
    sys.stderr = open(stderr_path, "w", buffering=1)  # noqa: SIM115 - the process ends with the call
    sys.argv = [str(ROOT / "eval.py"), *argv]
    runpy.run_path(str(ROOT / "eval.py"), run_name="__main__")


def test_eval_py_exits_non_zero_for_a_missing_checkpoint(tmp_path: Path) -> None:
    proc = multiprocessing.get_context("fork").Process(
        target=_run_eval_py,
        args=(["--config-name=tiny", f"eval.resume={tmp_path / 'nothing'}"], str(tmp_path / "stderr.txt")),
    )
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == 1
    assert (
        f"eval.py: error: no checkpoint file or run directory at {tmp_path / 'nothing'}"
        in (tmp_path / "stderr.txt").read_text()
    )
