"""Fault 7: a wandb API key in the environment must never reach a file under the run directory, the
logs, or what is sent to wandb.

Documented outcome (tvm/runtime/run_logging.py, README): the key is read from ``WANDB_API_KEY`` by wandb
itself; configs, checkpoints, ``log.txt``, ``stats.jsonl``, evaluation results and wandb's own files
never hold it — also when a config value carries it (``${oc.env:WANDB_API_KEY}`` or typed in), in
which case the value is redacted. A stand-in wandb module records everything the run gives it under
the run directory (as the real one does in ``<run_dir>/wandb``), so a leak into wandb is a leak
into a file. ``tests/runtime/test_run_logging.py`` covers the logger alone; this runs training and
evaluation end to end.
"""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from fault_tools import in_process_run
from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint

KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a wandb key (40 hex digits)


def _stand_in_wandb() -> types.ModuleType:
    """Records ``init`` arguments, logged data and images under ``<dir>/wandb``, like wandb's files."""
    module = types.ModuleType("wandb")

    class Run:
        def __init__(self, directory: Path) -> None:
            self.directory = directory

        def log(self, data: dict, step: int) -> None:
            with open(self.directory / "history.jsonl", "a") as handle:
                handle.write(json.dumps({"step": step, **{k: repr(v) for k, v in data.items()}}) + "\n")

        def finish(self) -> None:
            (self.directory / "finished").write_text("ok")

    def init(**kwargs: Any) -> Run:
        directory = Path(kwargs["dir"]) / "wandb"
        directory.mkdir(exist_ok=True)
        (directory / "init.json").write_text(json.dumps(kwargs, default=repr))
        return Run(directory)

    def login(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("wandb.login stores the key in ~/.netrc and must not be called")

    module.init, module.login = init, login
    module.Image = lambda path, caption=None: ("Image", str(path), caption)
    return module


def _strings(obj: Any) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for k, v in obj.items() for s in _strings(k) + _strings(v)]
    if isinstance(obj, (list, tuple)):
        return [s for v in obj for s in _strings(v)]
    return []


@pytest.mark.parametrize("where", ["environment only", "config interpolates it", "typed into a config value"])
def test_wandb_key_never_reaches_files_logs_or_wandb(where: str, tmp_path: Path, monkeypatch, capfd, ledger) -> None:
    monkeypatch.setenv("WANDB_API_KEY", KEY)
    monkeypatch.setitem(sys.modules, "wandb", _stand_in_wandb())
    run_dir = tmp_path / "run"
    extra = {
        "environment only": [],
        "config interpolates it": ["logger.entity=${oc.env:WANDB_API_KEY}"],
        "typed into a config value": [f"name=tiny-{KEY}"],
    }[where]
    in_process_run(
        QUICK_TINY
        + [
            f"run_dir={run_dir}",
            "training.total_ticks=2",
            "training.ckpt_ticks=1",
            "logger.mode=online",
            "training.do_log_image=true",
            "training.sample_ticks=1",
            "training.metrics=[digits]",
            "training.eval_ticks=2",
            "eval.num_images=20",
            *extra,
        ]
    )
    evaluate_checkpoints(
        compose_config("tiny", [f"eval.resume={run_dir}", "eval.metrics=[digits]", "eval.num_images=20", *extra])
    )
    captured = capfd.readouterr()
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    leaks = [str(p.relative_to(run_dir)) for p in files if KEY.encode() in p.read_bytes()]
    leaks += [
        f"{p.name} (decoded)"
        for p in CheckpointManager(run_dir).all()
        if any(KEY in s for s in _strings(load_checkpoint(p)))
    ]
    leaks += [name for name, text in (("stdout", captured.out), ("stderr", captured.err)) if KEY in text]
    kinds = {p.name for p in files}
    ledger.record(f"secrets: wandb key ({where})", leaks == [], len(leaks))
    assert {"config.yaml", "log.txt", "stats.jsonl", "init.json", "history.jsonl", "metrics-eval.jsonl"} <= kinds
    assert any(p.suffix == ".png" for p in files) and any(p.suffix == ".pt" for p in files)
    assert leaks == [], f"the key leaked into {leaks}"
