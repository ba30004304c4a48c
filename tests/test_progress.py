"""Progress reports (tvm/progress.py): a tqdm bar on a terminal, plain lines (no '\\r') in a redirected log."""

from __future__ import annotations

import io
import sys

from tqdm import tqdm

from tvm.progress import LineProgress, format_duration, is_terminal, progress_bar
from tvm.runtime.run_logging import RunLogger


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_a_redirected_stream_gets_plain_lines_without_carriage_returns() -> None:
    stream = io.StringIO()
    bar = progress_bar(total=500, desc="train", unit="step", file=stream, interval=0.0)
    assert isinstance(bar, LineProgress)
    for _ in range(500):
        bar.update(1)
    bar.close()
    text = stream.getvalue()
    assert "\r" not in text and "\x1b" not in text  # no bar redraws, no cursor movements
    assert text.count("\n") == 500 and text.splitlines()[-1].startswith("train: 500/500 step (100.0%)")


def test_a_terminal_gets_a_tqdm_bar() -> None:
    stream = _Terminal()
    bar = progress_bar(total=3, desc="x", file=stream)
    assert isinstance(bar, tqdm)
    bar.update(3)
    bar.close()
    assert "\r" in stream.getvalue()  # what tqdm does on a terminal, and what must not reach a log file
    assert not is_terminal(io.StringIO()) and is_terminal(stream)
    closed = io.StringIO()
    closed.close()
    assert not is_terminal(closed)


def test_lines_come_at_the_interval_with_rate_and_eta() -> None:
    clock, stream = _Clock(), io.StringIO()
    bar = LineProgress(total=1000, initial=100, desc="train", unit="step", interval=60.0, file=stream, clock=clock)
    for _ in range(10):  # 10 steps, 5 s each
        clock.now += 5.0
        bar.update(1)
    assert stream.getvalue() == ""  # 50 s: nothing yet
    clock.now += 10.0
    bar.update(1)  # 60 s after the start, 11 steps since the start
    lines = stream.getvalue().splitlines()
    assert lines == ["train: 111/1000 step (11.1%), 0.183 step/s, elapsed 1m00s, eta 1h20m49s"]  # 889 steps / (11/60 s)
    bar.update(1)  # right after a line: no new one
    assert len(stream.getvalue().splitlines()) == 1
    bar.close()
    bar.close()  # idempotent
    assert stream.getvalue().splitlines()[-1].startswith("train: 112/1000 step")
    assert len(stream.getvalue().splitlines()) == 2


def test_interval_none_prints_only_the_final_line_and_disabled_prints_nothing() -> None:
    clock, stream = _Clock(), io.StringIO()
    bar = LineProgress(total=10, interval=None, file=stream, clock=clock)
    for _ in range(10):
        clock.now += 100.0
        bar.update(1)
    bar.close()
    assert stream.getvalue() == "progress: 10/10 it (100.0%), 0.01 it/s, elapsed 16m40s\n"
    silent = io.StringIO()
    off = LineProgress(total=10, interval=0.0, disable=True, file=silent)
    off.update(10)
    off.close()
    assert silent.getvalue() == "" and off.n == 10


def test_iteration_passes_items_through_and_closes() -> None:
    stream = io.StringIO()
    bar = progress_bar(range(7), desc="convert", unit="img", file=stream, interval=None)
    assert list(bar) == list(range(7)) and bar.total == 7
    assert stream.getvalue().startswith("convert: 7/7 img (100.0%)")


def test_run_logger_progress_in_a_redirected_log_has_no_carriage_return(tmp_path, monkeypatch, capsys) -> None:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    with RunLogger(tmp_path, rank=0) as logger:
        bar = logger.progress(total=100)
        for _ in range(100):
            bar.update(1)
        logger.log("tick 1  step 100")
    assert "\r" not in stream.getvalue() and "\r" not in capsys.readouterr().out
    assert stream.getvalue().startswith("train: 100/100 step")  # the final line on close
    assert (tmp_path / "log.txt").read_text() == "tick 1  step 100\n"


def test_format_duration() -> None:
    assert format_duration(4.4) == "4s" and format_duration(75) == "1m15s" and format_duration(3725) == "1h02m05s"
    assert format_duration(2 * 86400 + 3600) == "2d01h00m"
