"""Graceful stop on Slurm preemption and time limits.

Slurm warns a job before killing it: submitit's ``slurm_signal_delay_s=120`` (docs/method.md §8.2) asks
for SIGUSR2 two minutes ahead, ``--signal`` setups often use SIGUSR1, and ``scancel``/preemption
send SIGTERM. Upstream had no hook at all, so a preempted run lost everything since the last
``ckpt_ticks`` checkpoint. ``PreemptionHandler`` records that such a signal arrived; the training
loop polls ``should_stop`` and, when it returns True on every rank, writes a checkpoint and exits
so that the requeued job resumes from it (docs/method.md §5.6, §8.2).

The signal handler only sets a flag (nothing else is safe inside a handler). Ranks agree on
stopping through an all-reduce (MAX) of their flags, done only every ``check_every`` steps so
that the training loop has no per-step host synchronisation; all ranks must therefore call
``should_stop`` with the same step numbers.

Signals must reach the training processes: torchrun forwards SIGTERM to its workers; for
SIGUSR1/SIGUSR2 launch one task per GPU (``srun``) or have the launcher forward them. The
previous handlers are *not* chained: submitit's own SIGUSR2 handler would requeue and exit before
the checkpoint is written.

SIGINT (Ctrl-C) stops the same way, with a checkpoint at the next agreed step boundary; rank 0
says so on stderr at once. A second SIGINT raises ``KeyboardInterrupt`` at once (no checkpoint;
the run resumes from the previous one). ``train.sh`` passes a Ctrl-C on to its workers exactly
once per press, so the first press checkpoints and the second aborts there too.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

import torch

from tvm.runtime import distributed

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name) for name in ("SIGUSR2", "SIGUSR1", "SIGTERM", "SIGINT") if hasattr(signal, name)
)
INTERRUPT_NOTICE = (
    b"\nSIGINT: stopping at the next step boundary with a checkpoint "
    b"(press Ctrl-C again to abort at once, without one)\n"
)


def ignore_interrupts(_worker_id: int = 0) -> None:
    """``worker_init_fn`` of data-loader workers: a Ctrl-C is the training process's to handle
    (a worker that died on it would end the run before its checkpoint)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PreemptionHandler:
    """Catches preemption signals and lets all ranks agree on a stop.

    ``device`` is where the agreement all-reduce runs (a CUDA device with NCCL, CPU with gloo).
    """

    def __init__(
        self, signals: tuple[signal.Signals, ...] = DEFAULT_SIGNALS, device: str | torch.device = "cpu"
    ) -> None:
        self.signals = tuple(signals)
        self.device = torch.device(device)
        self._flag = False
        self._signum: int | None = None
        self._agreed = False
        self._interrupted = False
        self._announce = False
        self._previous: dict[signal.Signals, Any] = {}

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Signal handler: record the signal; a second SIGINT aborts at once."""
        if signum == signal.SIGINT:
            if self._interrupted:
                raise KeyboardInterrupt("second SIGINT: stopped at once, without a checkpoint")
            self._interrupted = True
            if self._announce:
                os.write(2, INTERRUPT_NOTICE)  # async-signal-safe, unlike print
        self._flag = True
        self._signum = signum

    def install(self) -> PreemptionHandler:
        """Install the handler for ``self.signals``, remembering the previous handlers.

        Must run in the main thread (a Python restriction on ``signal.signal``).
        """
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionHandler.install() must be called from the main thread")
        self._announce = distributed.is_main()
        for sig in self.signals:
            if sig not in self._previous:
                self._previous[sig] = signal.signal(sig, self._on_signal)
        return self

    def uninstall(self) -> None:
        """Restore the handlers that were active before ``install``."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    def __enter__(self) -> PreemptionHandler:
        return self.install()

    def __exit__(self, *exc_info: object) -> None:
        self.uninstall()

    def requested(self) -> bool:
        """True once this process received one of the signals (local; no communication)."""
        return self._flag

    @property
    def signal_name(self) -> str | None:
        """Name of the last signal received (e.g. ``"SIGUSR2"``), for the log."""
        return None if self._signum is None else signal.Signals(self._signum).name

    def request(self) -> None:
        """Ask for a stop from code (e.g. a wall-clock budget), as if a signal had arrived."""
        self._flag = True

    def should_stop(self, step: int, check_every: int = 10) -> bool:
        """Whether all ranks should stop now; the ranks agree via an all-reduce (MAX).

        The collective (and its host sync) runs only when ``step % check_every == 0``; at other
        steps the last agreed value is returned. Once True it stays True. Collective: every rank
        must call it with the same ``step`` sequence.
        """
        if check_every < 1:
            raise ValueError(f"check_every must be >= 1, got {check_every}")
        if self._agreed or step % check_every != 0:
            return self._agreed
        flag = torch.tensor([1.0 if self._flag else 0.0], device=self.device)
        distributed.all_reduce_max_(flag)
        self._agreed = bool(flag.item() > 0)
        return self._agreed
