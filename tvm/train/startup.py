"""Where a training run's start-up goes: the seconds of each phase, logged as one line.

The loop marks the end of each start-up phase (:meth:`StartupClock.mark`); once its first optimizer
step has finished on the device it logs :meth:`StartupClock.line`, e.g.::

    start-up: set-up 2.1 s, checkpoint read 6.3 s, build 0.4 s (initialisation skipped), restore 1.9 s,
    compile cache 3.2 s, other set-up 1.0 s, first step 71.5 s; 86.4 s in run()

The phases partition the time from the start of ``run()`` to the end of the first step, so they add
up to the total; what precedes ``run()`` (the launcher, Python's start, the imports) is not in it.
:func:`parse_startup_line` reads such a line back (bench/cold_start.py prints the breakdown).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

PREFIX = "start-up:"
# The phases the training loop marks, in order (tvm/train/loop.py).
PHASES = ("set-up", "checkpoint read", "build", "restore", "compile cache", "other set-up", "first step")
_PHASE = re.compile(r"([a-z][a-z -]*?) (\d+(?:\.\d+)?) s\b")
_TOTAL = re.compile(r"; (\d+(?:\.\d+)?) s in run\(\)")


class StartupClock:
    """Seconds per start-up phase, in order: each :meth:`mark` closes the phase since the previous one."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter) -> None:
        self._clock = clock
        self._start = self._last = clock()
        self.phases: list[tuple[str, float, str]] = []  # (name, seconds, note)

    def mark(self, phase: str, note: str = "") -> None:
        """End ``phase`` now; ``note`` (no figures in seconds) is printed after its time."""
        if not _PHASE.fullmatch(f"{phase} 0 s"):
            raise ValueError(f"start-up phase names are lower-case words, got {phase!r}")
        now = self._clock()
        self.phases.append((phase, now - self._last, note))
        self._last = now

    @property
    def finished(self) -> bool:
        """Whether the last phase (:data:`PHASES`' last, the first step) is marked."""
        return bool(self.phases) and self.phases[-1][0] == PHASES[-1]

    def line(self) -> str:
        """The log line: every phase with its seconds and note, then the total since the clock started."""
        parts = [f"{name} {seconds:.1f} s" + (f" ({note})" if note else "") for name, seconds, note in self.phases]
        return f"{PREFIX} {', '.join(parts)}; {self._last - self._start:.1f} s in run()"


def parse_startup_line(text: str) -> dict[str, float] | None:
    """The phases and their seconds of the first start-up line in ``text`` (``"total"``: the seconds in
    ``run()``), or None when ``text`` holds no such line."""
    for line in text.splitlines():
        if line.startswith(PREFIX):
            head, _, _ = line[len(PREFIX) :].partition(";")
            phases = {name.strip(): float(seconds) for name, seconds in _PHASE.findall(re.sub(r"\([^)]*\)", "", head))}
            total = _TOTAL.search(line)
            if total is not None:
                phases["total"] = float(total.group(1))
            return phases
    return None
