"""Run logging: jsonl, log.txt, status line, wandb handling and secret hygiene (tvm/runtime/run_logging.py)."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest

from tvm.runtime import run_logging as L
from tvm.runtime.run_logging import RunLogger

FAKE_KEY = "fakekey0123456789abcdef0123456789abcdef01"


class _FakeRun:
    """Stands in for a wandb run; persists what it is given, as wandb would, so leaks are visible."""

    def __init__(self, calls: list, directory: Path) -> None:
        self.calls = calls
        self.directory = directory

    def log(self, data: dict, step: int) -> None:
        self.calls.append(("log", data, step))
        with open(self.directory / "fake-wandb-history.jsonl", "a") as handle:
            handle.write(json.dumps({k: str(v) for k, v in data.items()}) + "\n")

    def finish(self) -> None:
        self.calls.append(("finish",))


def _fake_wandb(calls: list) -> types.ModuleType:
    module = types.ModuleType("wandb")

    def init(**kwargs):
        calls.append(("init", kwargs))
        directory = Path(kwargs["dir"]) / "wandb"
        directory.mkdir(exist_ok=True)
        (directory / "fake-config.json").write_text(json.dumps(kwargs, default=str))
        return _FakeRun(calls, directory)

    def login(*args, **kwargs):
        raise AssertionError("wandb.login must not be called (it stores the key in ~/.netrc)")

    module.init = init
    module.login = login
    module.Image = lambda path, caption=None: ("Image", path, caption)
    return module


def _all_text(directory: Path) -> str:
    return "".join(p.read_bytes().decode("utf-8", "replace") for p in directory.rglob("*") if p.is_file())


def test_stats_jsonl_and_log_txt(tmp_path: Path, capsys) -> None:
    with RunLogger(tmp_path, rank=0) as logger:
        logger.log("hello")
        logger.log_stats({"Loss/fm_loss_q0": 0.5, "bad": float("nan")}, step=100, tick=1)
        logger.log_stats({"Loss/fm_loss_q0": 0.25}, step=200, tick=2)
        logger.log_images("grid", tmp_path / "grid.png", step=200)  # wandb off: no-op
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    assert [(r["step"], r["tick"], r["Loss/fm_loss_q0"]) for r in lines] == [(100, 1, 0.5), (200, 2, 0.25)]
    assert lines[0]["bad"] is None and isinstance(lines[0]["time"], float)
    assert (tmp_path / "log.txt").read_text() == "hello\n"
    assert "hello" in capsys.readouterr().out
    with RunLogger(tmp_path, rank=0) as logger:  # a resumed run appends
        logger.log_stats({"x": 1.0}, step=300)
    assert len((tmp_path / "stats.jsonl").read_text().splitlines()) == 3


def test_other_ranks_write_nothing(tmp_path: Path, capsys) -> None:
    run_dir = tmp_path / "run"
    with RunLogger(run_dir, rank=1, wandb_mode="offline") as logger:
        logger.log("hidden")
        logger.log_stats({"x": 1.0}, step=1)
        bar = logger.progress(total=10)
        assert bar.disable
    assert not run_dir.exists() and "hidden" not in capsys.readouterr().out


def test_progress_bar_on_rank_zero(tmp_path: Path) -> None:
    with RunLogger(tmp_path, rank=0) as logger:
        bar = logger.progress(total=100, initial=40)
        bar.update(5)
        assert (bar.n, bar.total, bar.disable) == (45, 100, False)
        logger.log("above the bar")
    assert "above the bar" in (tmp_path / "log.txt").read_text()


def test_status_line_fields() -> None:
    line = L.status_line(
        tick=7,
        kimg=1433.6,
        sec_per_kimg=1.234,
        img_per_sec=810.4,
        peak_mem_gb=12.5,
        mfu=0.385,
        losses={"terminal": L.binned_means({"T_q0": 0.1, "T_q2": 0.3}, "T"), "fm": [1.0, 2.0, 3.0, 4.0]},
    )
    for part in (
        "tick 7",
        "kimg 1433.6",
        "sec/kimg 1.234",
        "img/s 810.4",
        "mfu 38.5%",
        "mem 12.50GB",
        "terminal 0.1/-/0.3/-",
        "fm 1/2/3/4",
    ):
        assert part in line
    assert "mfu" not in L.status_line(tick=1, kimg=0.1, sec_per_kimg=1.0, img_per_sec=1.0)
    assert L.peak_memory_gb("cpu") > 0
    assert L.format_duration(3725) == "1h02m05s" and L.format_duration(2 * 86400 + 3600) == "2d01h00m"


def test_sanitize_config_drops_secret_keys(monkeypatch) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    config = {
        "logger": {"project": "p", "api_key": "abc", "entity": "e"},
        "auth": [{"token": "t", "hf_token": "h", "num_tokens": 3}],
        "password": "pw",
        "wandb_key": "k",
        "note": f"key={FAKE_KEY}",
        "tokenizer": "bpe",
    }
    assert L.sanitize_config(config) == {
        "logger": {"project": "p", "entity": "e"},
        "auth": [{"num_tokens": 3}],
        "note": "key=<redacted>",
        "tokenizer": "bpe",
    }


def test_api_key_never_written_or_printed(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    config = {"name": "run", "logger": {"project": "p", "api_key": FAKE_KEY}, "echo": FAKE_KEY}
    with RunLogger(tmp_path, rank=0, wandb_mode="online", project="p", run_name="run", config_dict=config) as logger:
        assert logger.wandb_mode == "online"
        logger.log(f"accidentally printing {FAKE_KEY}")
        logger.log_stats({"loss": 1.0}, step=1, note=FAKE_KEY)
        logger.log_images("grid", tmp_path / "grid.png", step=1)
    init = [c for c in calls if c[0] == "init"]
    assert len(init) == 1 and init[0][1]["mode"] == "online" and init[0][1]["config"]["logger"] == {"project": "p"}
    assert ("log", {"grid": ("Image", str(tmp_path / "grid.png"), None)}, 1) in calls
    captured = capsys.readouterr()
    assert FAKE_KEY not in captured.out + captured.err
    assert FAKE_KEY not in repr(calls)
    assert FAKE_KEY not in _all_text(tmp_path)
    assert (tmp_path / "wandb" / "fake-config.json").exists()


def test_online_without_key_falls_back_to_disabled(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    with pytest.warns(RuntimeWarning, match="WANDB_API_KEY is not set"):
        logger = RunLogger(tmp_path, rank=0, wandb_mode="online", project="p")
    assert logger.wandb_mode == "disabled" and calls == []
    logger.close()


def test_disabled_mode_does_not_import_wandb(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "wandb", None)  # any import attempt would raise ImportError
    with RunLogger(tmp_path, rank=0, wandb_mode="disabled") as logger:
        logger.log_stats({"x": 1.0}, step=1)
    with pytest.warns(RuntimeWarning, match="wandb is not installed"):
        logger = RunLogger(tmp_path, rank=0, wandb_mode="offline")
    assert logger.wandb_mode == "disabled"
    logger.close()
    with pytest.raises(ValueError, match="wandb mode"):
        RunLogger(tmp_path, rank=0, wandb_mode="sometimes")


def test_offline_mode_and_stable_run_id(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    calls: list = []
    monkeypatch.setitem(sys.modules, "wandb", _fake_wandb(calls))
    for _ in range(2):  # a requeued job continues the same wandb run
        RunLogger(tmp_path, rank=0, wandb_mode="offline", project="p").close()
    first, second = (c[1] for c in calls if c[0] == "init")
    assert first["mode"] == "offline" and first["id"] == second["id"] and first["resume"] == "allow"
