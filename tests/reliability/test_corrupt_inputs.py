"""Fault 5: corrupt or mismatched inputs, through the entry points a user runs (training's ``run``,
``evaluate_checkpoints``, Hydra composition).

Documented outcome: each is an error that names the file (and the key, where one is at fault)
before any training step, or — for a newest checkpoint torn by a crash — a warning naming it and a
resume from the previous one; no checkpoint is written by a run that refused its inputs.
The library-level checks have unit tests in tests/data, tests/eval and tests/train; these check
that the entry points surface them.
"""

from __future__ import annotations

import io
import json
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from fault_tools import in_process_run, load_final, same_training_state
from helpers import QUICK_TINY
from tvm.config import CONFIG_DIR, compose_config
from tvm.eval import fid
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.runtime.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, save_checkpoint

QUICK = QUICK_TINY + ["training.total_ticks=2", "training.ckpt_ticks=1", "training.snapshot_ticks=1000"]
IMAGES = ["dataset.class_name=tvm.data.datasets.ImageFolderDataset"]


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished quick run (hidden size 32, depth 2) with checkpoints at steps 2 and 4."""
    run_dir = tmp_path_factory.mktemp("source")
    in_process_run(QUICK + [f"run_dir={run_dir}"])
    return run_dir


def _png(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="png")
    return buffer.getvalue()


def _image_files(labels: object = "good") -> dict[str, bytes]:
    names = [f"00000/img{i:08d}.png" for i in range(8)]
    files = {name: _png(i) for i, name in enumerate(names)}
    table = [[name, i % 4] for i, name in enumerate(names)] if labels == "good" else labels
    files["dataset.json"] = json.dumps({"labels": table}).encode()
    return files


def _folder(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _truncated_zip(tmp: Path) -> tuple[list[str], str]:
    path = tmp / "images.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in _image_files().items():
            archive.writestr(name, data)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return IMAGES + [f"dataset.path={path}"], rf"{path}.*(corrupt or truncated)"


def _png_of_the_wrong_size(tmp: Path) -> tuple[list[str], str]:
    files = _image_files()
    files["00000/img00000005.png"] = _png(5, size=16)
    root = _folder(tmp / "images", files)
    return IMAGES + [f"dataset.path={root}"], r"img00000005\.png: shape \[C,H,W\]=\[3, 16, 16\] differs"


def _truncated_png(tmp: Path) -> tuple[list[str], str]:
    files = _image_files()
    files["00000/img00000003.png"] = files["00000/img00000003.png"][:60]  # header intact, pixels cut off
    root = _folder(tmp / "images", files)
    return IMAGES + [f"dataset.path={root}"], r"img00000003\.png: failed to read"


def _bad_labels(kind: str) -> Callable[[Path], tuple[list[str], str]]:
    def make(tmp: Path) -> tuple[list[str], str]:
        names = [f"00000/img{i:08d}.png" for i in range(8)]
        table = {
            "string label": [[n, "cat" if i == 6 else i % 4] for i, n in enumerate(names)],
            "unknown file": [[n, i % 4] for i, n in enumerate(names)] + [["00000/ghost.png", 1]],
            "missing label": [[n, i % 4] for i, n in enumerate(names[:-1])],
            "not json": None,
        }[kind]
        files = _image_files(table)
        if kind == "not json":
            files["dataset.json"] = b'{"labels": [["00000/img00000000.png", 1],'
        root = _folder(tmp / "images", files)
        return IMAGES + [f"dataset.path={root}"], rf"{root / 'dataset.json'}: "

    return make


@pytest.mark.parametrize(
    "make",
    [
        _truncated_zip,
        _png_of_the_wrong_size,
        _truncated_png,
        _bad_labels("string label"),
        _bad_labels("unknown file"),
        _bad_labels("missing label"),
        _bad_labels("not json"),
    ],
    ids=[
        "truncated zip",
        "png of the wrong size",
        "truncated png",
        "label not an int",
        "label for an unknown file",
        "file without a label",
        "dataset.json not json",
    ],
)
def test_corrupt_dataset_names_the_file(make, tmp_path: Path, request, ledger) -> None:
    overrides, pattern = make(tmp_path)
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern) as info:
        in_process_run(QUICK + [f"run_dir={run_dir}", *overrides])
    written = list(run_dir.glob("checkpoint-*")) if run_dir.exists() else []
    ledger.record(f"corrupt input: {request.node.callspec.id}", written == [])
    assert written == [], f"a refused dataset produced checkpoints ({info.value})"


def test_truncated_checkpoint_given_explicitly_is_named(source: Path, tmp_path: Path, ledger) -> None:
    broken = tmp_path / "checkpoint-00000004.pt"
    data = (source / broken.name).read_bytes()
    outcomes = []
    for cut in (len(data) // 2, len(data) - 100, 10):
        broken.write_bytes(data[:cut])
        for key in ("training.resume", "training.transfer"):
            with pytest.raises(CheckpointError, match=rf"{broken}: .*(truncated or corrupt|not a torch zip)"):
                in_process_run(QUICK + [f"run_dir={tmp_path / 'run'}", f"{key}={broken}"])
            outcomes.append(not list((tmp_path / "run").glob("checkpoint-*")))
        with pytest.raises(CheckpointError, match=str(broken)):
            evaluate_checkpoints(compose_config("tiny", [f"eval.resume={broken}", "eval.metrics=[digits]"]))
        outcomes.append(True)
    for ok in outcomes:
        ledger.record("corrupt input: truncated checkpoint (resume/transfer/eval)", ok)
    assert all(outcomes)


def test_truncated_newest_checkpoint_in_the_run_directory_is_skipped(source: Path, tmp_path: Path, ledger) -> None:
    """A crash that tore the newest file (a copy, a sync tool, a full disk outside our atomic writer):
    the run resumes from the one before, says which file it skipped, and ends like the original."""
    run_dir = tmp_path / "run"
    shutil.copytree(source, run_dir)
    newest = run_dir / "checkpoint-00000004.pt"
    newest.write_bytes(newest.read_bytes()[:5000])
    with pytest.warns(RuntimeWarning, match=rf"skipping unreadable checkpoint: .*{newest}"):
        in_process_run(QUICK + [f"run_dir={run_dir}"])
    diff = same_training_state(load_final(run_dir), load_final(source))
    resumed = f"resumed from {run_dir / 'checkpoint-00000002.pt'}" in (run_dir / "log.txt").read_text()
    ledger.record("corrupt input: truncated newest checkpoint in the run directory", diff == [] and resumed)
    assert resumed and diff == [], diff[:5]


@pytest.mark.parametrize(
    "how, change, expect",
    [
        (
            "auto-resume",
            "network.hidden_size=48",
            r"model\.\S+ is \[.*\] in the checkpoint but \[.*\] here"
            r".*network\.hidden_size: 32 in the checkpoint, 48 here",
        ),
        (
            "training.resume",
            "network.depth=3",
            r"keys missing, e.g. model\.blocks\.2\..*network\.depth: 2 in the checkpoint, 3 here",
        ),
        ("training.transfer", "network.hidden_size=64", r"'ema' weights do not fit.*network\.hidden_size"),
    ],
)
def test_checkpoint_of_another_model_size_names_the_file_and_the_setting(
    how: str, change: str, expect: str, source: Path, tmp_path: Path, ledger
) -> None:
    checkpoint = source / "checkpoint-00000004.pt"
    if how == "auto-resume":
        run_dir = tmp_path / "run"
        shutil.copytree(source, run_dir)
        checkpoint, extra = run_dir / checkpoint.name, []
        before = sorted(p.name for p in run_dir.iterdir())
    else:
        run_dir, extra, before = tmp_path / "run", [f"{how}={checkpoint}"], []
    with pytest.raises(CheckpointError, match=rf"{checkpoint}: .*{expect}") as info:
        in_process_run(QUICK + [f"run_dir={run_dir}", change, *extra])
    after = sorted(p.name for p in run_dir.glob("checkpoint-*"))
    unchanged = after == [name for name in before if name.startswith("checkpoint-")]
    ledger.record(f"corrupt input: checkpoint of another model size ({how})", unchanged)
    assert unchanged, info.value


def _ref_stats(tmp: Path, resolution: int) -> Path:
    path = tmp / f"ref{resolution}.npz"
    fid.save_ref_stats(path, fid.RefStats(np.zeros(8), np.eye(8), num_images=100, resolution=resolution))
    return path


def test_reference_statistics_of_another_resolution_are_named(source: Path, tmp_path: Path, ledger) -> None:
    ref = _ref_stats(tmp_path, 32)  # the digits are 8×8
    detector = tmp_path / "never-loaded.pt"
    pattern = rf"{ref}: reference statistics are for resolution 32, the images are 8"
    run_dir = tmp_path / "run"
    with pytest.raises(ValueError, match=pattern):  # at start-up, not at the first evaluation
        in_process_run(
            QUICK
            + [
                f"run_dir={run_dir}",
                "training.metrics=[fid50k_full]",
                f"eval.ref_stats={ref}",
                f"eval.detector_url={detector}",
                "training.no_eval_before_tick=100",
            ]
        )
    trained = list(run_dir.glob("checkpoint-*"))
    ledger.record("corrupt input: reference statistics of another resolution (training)", trained == [])
    assert trained == []
    with pytest.raises(ValueError, match=pattern):
        evaluate_checkpoints(
            compose_config(
                "tiny",
                [
                    f"eval.resume={source / 'checkpoint-00000004.pt'}",
                    "eval.metrics=[fid50k_full]",
                    f"eval.ref_stats={ref}",
                    f"eval.detector_url={detector}",
                    "eval.num_images=16",
                ],
            )
        )
    ledger.record("corrupt input: reference statistics of another resolution (eval)", True)  # raised as documented


def test_unknown_config_keys_are_named(source: Path, tmp_path: Path, ledger) -> None:
    # In an experiment's YAML file (what train.py --config-dir/--config-name reads).
    configs = tmp_path / "configs"
    shutil.copytree(CONFIG_DIR, configs)
    (configs / "mine.yaml").write_text("defaults:\n  - tiny\n  - _self_\n\ntraining:\n  ckpt_tick: 5\n")
    with initialize_config_dir(config_dir=str(configs), version_base=None):
        with pytest.raises(ConfigCompositionException, match=r"In 'mine'.*\n?.*ckpt_tick") as info:
            compose(config_name="mine")
    assert "training.ckpt_tick" in str(info.value)
    ledger.record("corrupt input: unknown key in a config file", True)  # raised as documented
    # In the configuration stored inside a checkpoint (e.g. written by a newer version).
    content = load_checkpoint(source / "checkpoint-00000004.pt")
    content["config"]["training"]["ckpt_tick"] = 5
    foreign = save_checkpoint(tmp_path / "checkpoint-00000004.pt", content)
    with pytest.raises(CheckpointError, match=rf"{foreign}: the stored config .*ckpt_tick"):
        evaluate_checkpoints(compose_config("tiny", [f"eval.resume={foreign}", "eval.metrics=[digits]"]))
    ledger.record("corrupt input: unknown key in a checkpoint's stored config", True)
    assert torch.equal(load_checkpoint(foreign)["ema"]["model.pos_embed"], content["ema"]["model.pos_embed"])
    assert CheckpointManager(tmp_path).all() == [foreign]
