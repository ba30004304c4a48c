"""Fixtures of the fault-injection suite (issue 9, docs/reliability.md).

* ``ledger``: every test records each fault it injected and whether the documented outcome held;
  the counts are printed as a table at the end of the session (and written as JSON to
  ``$TVM_RELIABILITY_REPORT`` when that variable is set), which is where docs/reliability.md's
  numbers come from.
* ``reference``: the uninterrupted run that the kill -9 and signal trials must reproduce exactly.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from helpers import single_thread

sys.path.insert(0, str(Path(__file__).parent))  # makes fault_tools.py importable

from fault_tools import RUN, in_process_run, load_final  # noqa: E402

_COUNTS: dict[str, dict[str, int]] = {}
_NOTES: list[str] = []


class Ledger:
    """Counts per fault class: trials, trials whose documented outcome held, data lost."""

    def record(self, fault: str, survived: bool, lost: int = 0) -> None:
        """One injected fault named ``"<class>: <fault>"``; ``lost`` counts training steps (or files) lost beyond
        what the documented outcome allows (e.g. beyond the checkpoint interval)."""
        row = _COUNTS.setdefault(fault, {"tried": 0, "survived": 0, "lost": 0})
        row["tried"] += 1
        row["survived"] += int(bool(survived))
        row["lost"] += int(lost)

    def note(self, text: str) -> None:
        """A line of detail printed under the tables (e.g. where the kills landed)."""
        _NOTES.append(text)


@pytest.fixture(scope="session")
def ledger() -> Ledger:
    return Ledger()


def pytest_terminal_summary(terminalreporter) -> None:
    """The ledger as tables: per fault class (the part of a name before ':'), then per fault."""
    if not _COUNTS:
        return
    classes: dict[str, dict[str, int]] = {}
    for name, row in _COUNTS.items():
        total = classes.setdefault(name.split(":")[0], {"tried": 0, "survived": 0, "lost": 0})
        for key in total:
            total[key] += row[key]
    for title, table in (("per class", classes), ("per fault", _COUNTS)):
        terminalreporter.section(f"fault injection {title}: tried / survived / lost")
        width = max(len(name) for name in table)
        for name, row in sorted(table.items()):
            terminalreporter.write_line(f"{name:<{width}}  {row['tried']:>4}  {row['survived']:>4}  {row['lost']:>4}")
    total = {key: sum(row[key] for row in _COUNTS.values()) for key in ("tried", "survived", "lost")}
    terminalreporter.write_line(f"{'total':<{width}}  {total['tried']:>4}  {total['survived']:>4}  {total['lost']:>4}")
    for text in _NOTES:
        terminalreporter.write_line(text)
    report = os.environ.get("TVM_RELIABILITY_REPORT")
    if report:
        Path(report).write_text(
            json.dumps({"classes": classes, "faults": _COUNTS, "notes": _NOTES}, indent=1, sort_keys=True) + "\n"
        )


one_thread = pytest.fixture(autouse=True, scope="module", name="one_thread")(single_thread)


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The final checkpoint of one uninterrupted ``RUN`` (one process, one thread)."""
    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = in_process_run(RUN + [f"run_dir={run_dir}"])
    finally:
        torch.set_num_threads(threads)
    assert not result["preempted"]
    return load_final(run_dir)
