"""The start-up line: phases timed by a clock, logged as one line and read back (tvm/train/startup.py),
and the table bench/cold_start.py makes of it."""

from __future__ import annotations

import pytest

from tvm.train.startup import StartupClock, parse_startup_line


def ticking_clock(*times: float):
    """A clock that returns ``times`` in turn."""
    values = iter(times)
    return lambda: next(values)


def test_phases_partition_the_time_and_read_back():
    clock = StartupClock(ticking_clock(10.0, 12.5, 12.5, 40.25, 100.0))
    clock.mark("set-up")
    clock.mark("checkpoint read")
    clock.mark("build", "initialisation skipped: the checkpoint replaces it")
    clock.mark("first step")
    line = clock.line()
    assert line == (
        "start-up: set-up 2.5 s, checkpoint read 0.0 s, build 27.8 s (initialisation skipped: the checkpoint "
        "replaces it), first step 59.8 s; 90.0 s in run()"
    )
    assert parse_startup_line(f"tick 1 step 1\n{line}\nstart-up: set-up 9.0 s; 9.0 s in run()") == {
        "set-up": 2.5,
        "checkpoint read": 0.0,
        "build": 27.8,
        "first step": 59.8,
        "total": 90.0,
    }
    assert parse_startup_line("tick 1 step 1\n") is None


@pytest.mark.parametrize("name", ["Build", "first step 2", "build (init)", ""])
def test_a_phase_name_that_would_not_read_back_is_refused(name):
    with pytest.raises(ValueError, match="start-up phase names"):
        StartupClock().mark(name)


def test_cold_start_table_splits_the_seconds_by_phase():
    from bench.cold_start import PHASES, table

    phases = dict.fromkeys(PHASES, 1.0) | {"first step": 50.0, "total": 56.0}
    lines = table([("cold", 80.5, phases), ("run-dir cache", None, None), ("local cache", 30.0, None)]).splitlines()
    assert lines[0].startswith("| start | seconds to the first finished step | before run() | set-up |")
    assert lines[2] == "| cold | 80.5 | 24.5 | 1.0 | 1.0 | 1.0 | 1.0 | 1.0 | 1.0 | 50.0 |"
    assert lines[3] == "| run-dir cache | not reached | - | - | - | - | - | - | - | - |"
    assert lines[4] == "| local cache | 30.0 | - | - | - | - | - | - | - | - |"
