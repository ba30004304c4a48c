"""Progress reports that suit where the output goes.

On a terminal, :func:`progress_bar` returns a tqdm bar. When the stream is not a terminal (a job's
log redirected to a file, a Slurm output file, a pipe), a tqdm bar would write a carriage return
(``\\r``) and a whole new bar several times a second, so that the file fills with one huge line;
there it returns a :class:`LineProgress` instead, which prints one plain line at most every
``interval`` seconds (``None``: never, only the final line) and a final line when closed.

Both offer the subset of tqdm's interface this package uses: iteration, ``update``, ``write``,
``close`` and use as a context manager.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_INTERVAL = 60.0  # seconds between two plain progress lines


def is_terminal(stream: Any) -> bool:
    """True when ``stream`` is an open terminal (``isatty``); False for files, pipes, closed streams."""
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except (ValueError, OSError):  # closed or detached stream
        return False


def format_duration(seconds: float) -> str:
    """``3725`` -> ``"1h02m05s"``; ``59.4`` -> ``"59s"``; days shown as ``"2d03h"``."""
    seconds = int(round(seconds))
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


class LineProgress:
    """Progress as plain lines, for streams that are not terminals (no ``\\r``, no bar redraws).

    A line reads ``desc: 1200/300000 step (0.4%), 3.41 step/s, elapsed 5m52s, eta 24h19m...``; it
    is printed by ``update`` when ``interval`` seconds have passed since the start or the previous
    line, and once by ``close`` when progress was made since the last line. ``write`` prints a
    message on stdout like ``tqdm.write``. ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        total: int | None = None,
        initial: int = 0,
        desc: str | None = None,
        unit: str = "it",
        disable: bool = False,
        interval: float | None = DEFAULT_INTERVAL,
        file: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is None and isinstance(iterable, Sized):
            total = len(iterable)
        self.iterable = iterable
        self.total = total
        self.n = self._start_n = self._reported_n = initial
        self.desc = desc or "progress"
        self.unit = unit
        self.disable = disable
        self.interval = interval
        self.file = file if file is not None else sys.stderr
        self._clock = clock
        self._start = self._last = clock()
        self._closed = False

    def line(self) -> str:
        """The current progress line (without a newline)."""
        elapsed = max(self._clock() - self._start, 0.0)
        done = self.n - self._start_n
        rate = done / elapsed if elapsed > 0 else None
        text = f"{self.desc}: {self.n}"
        if self.total:
            text += f"/{self.total} {self.unit} ({100 * self.n / self.total:.1f}%)"
        else:
            text += f" {self.unit}"
        if rate:
            text += f", {rate:.3g} {self.unit}/s"
        text += f", elapsed {format_duration(elapsed)}"
        if rate and self.total and self.n < self.total:
            text += f", eta {format_duration((self.total - self.n) / rate)}"
        return text

    def _emit(self) -> None:
        print(self.line(), file=self.file, flush=True)
        self._last = self._clock()
        self._reported_n = self.n

    def update(self, n: int = 1) -> None:
        """Advance by ``n``; print a line if ``interval`` seconds passed since the last one."""
        self.n += n
        if self.disable or self.interval is None:
            return
        if self._clock() - self._last >= self.interval:
            self._emit()

    def write(self, message: str) -> None:
        """Print ``message`` on stdout (what ``tqdm.write`` does by default)."""
        print(message, flush=True)

    def close(self) -> None:
        """Print the final line (when progress was made since the last one); idempotent."""
        if self._closed:
            return
        self._closed = True
        if not self.disable and self.n != self._reported_n:
            self._emit()

    def __iter__(self) -> Iterator[Any]:
        if self.iterable is None:
            raise TypeError("LineProgress was created without an iterable")
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    interval: float | None = DEFAULT_INTERVAL,
    file: TextIO | None = None,
    **options: Any,
) -> tqdm | LineProgress:
    """A tqdm bar when ``file`` (default stderr) is a terminal, else a :class:`LineProgress`.

    ``options``: ``total``, ``initial``, ``desc``, ``unit``, ``disable``, with tqdm's meaning.
    ``interval``: seconds between plain lines in the second case (``None``: only the final line).
    """
    stream = file if file is not None else sys.stderr
    if is_terminal(stream):
        return tqdm(iterable, dynamic_ncols=True, file=stream, **options)
    return LineProgress(iterable, interval=interval, file=stream, **options)
