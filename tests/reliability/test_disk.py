"""Fault 4: the disk fills up, or the run directory becomes unwritable, during a checkpoint write.

Documented outcome (tvm/runtime/checkpoint.py, tvm/train/loop.py): training stops with
``CheckpointWriteError`` naming the file and the reason (``disk is full (ENOSPC)``, ``not
writable``), on every rank alike; the previous checkpoint is intact byte for byte, no partial file
is left under a checkpoint name nor as a temporary file; once space is freed, restarting on the
directory resumes from that checkpoint and ends exactly where an uninterrupted run ends.

Disk full is injected where a real one shows up: inside ``torch.save`` after part of the data was
written, at ``fsync`` (delayed allocation, network file systems) and at the final ``close``. An
unwritable directory is made with ``chmod`` — except as root, where permission bits do not stop
writes: then the kernel's answer (``EACCES``, or ``EROFS`` for a read-only mount) is injected at
``open``. The unit tests in tests/runtime/test_checkpoint.py cover ``save_checkpoint`` alone; these go
through the training loop.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fault_tools import FileWrapper, in_process_run, load_final, same_training_state, temp_files, watchdog
from helpers import QUICK_TINY, fork_ranks
from tvm.runtime import checkpoint as ckpt
from tvm.runtime.checkpoint import CheckpointManager, CheckpointWriteError

RUN = QUICK_TINY + ["training.total_ticks=3", "training.ckpt_ticks=1", "training.snapshot_ticks=1000"]
FAILING_STEP = 4  # the second checkpoint (2 steps per tick)
IS_ROOT = os.geteuid() == 0
PREEMPTION_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    in_process_run(RUN + [f"run_dir={run_dir}"])
    return load_final(run_dir)


class DiskFault:
    """Arms a fault for the checkpoint of ``FAILING_STEP`` and remembers the previous file's bytes."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
        self.kind = kind
        self.armed = False
        self.previous: bytes | None = None
        self.mechanism = kind
        real_save = CheckpointManager.save

        def save(manager: CheckpointManager, state: Any, step: int) -> Path:
            self.armed = step == FAILING_STEP
            if self.armed:
                self.previous = manager.path_for(FAILING_STEP - 2).read_bytes()
                if kind == "unwritable" and not IS_ROOT:
                    manager.run_dir.chmod(0o500)
            try:
                return real_save(manager, state, step)
            finally:
                if self.armed and kind == "unwritable" and not IS_ROOT:
                    manager.run_dir.chmod(0o755)
                self.armed = False

        monkeypatch.setattr(CheckpointManager, "save", save)
        if kind == "full in torch.save":
            real_torch_save = torch.save

            def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
                if not self.armed:
                    return real_torch_save(obj, f, *args, **kwargs)
                f.write(b"PK\x03\x04" + b"\x00" * 4096)  # what fit before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(ckpt.torch, "save", torch_save)
        elif kind == "full at fsync":
            real_fsync = os.fsync

            def fsync(fd: int) -> None:
                if self.armed and not os.path.isdir(f"/proc/self/fd/{fd}"):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fsync(fd)

            monkeypatch.setattr(ckpt.os, "fsync", fsync)
        elif kind == "full at close":
            real_open = open

            class FailingClose(FileWrapper):
                def __exit__(self, *exc_info: object) -> None:
                    super().__exit__(*exc_info)
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

            monkeypatch.setattr(
                ckpt,
                "open",
                lambda *a, **k: FailingClose(real_open(*a, **k)) if self.armed else real_open(*a, **k),
                raising=False,
            )
        elif kind in ("unwritable", "read-only file system") and (IS_ROOT or kind == "read-only file system"):
            code = errno.EACCES if kind == "unwritable" else errno.EROFS
            self.mechanism = f"{kind} ({errno.errorcode[code]} injected at open{' as root' if IS_ROOT else ''})"
            real_open = open

            def denied(*args: Any, **kwargs: Any) -> Any:
                if self.armed:
                    raise OSError(code, os.strerror(code), str(args[0]))
                return real_open(*args, **kwargs)

            monkeypatch.setattr(ckpt, "open", denied, raising=False)


@pytest.mark.parametrize(
    "kind, reason",
    [
        ("full in torch.save", "disk is full (ENOSPC)"),
        ("full at fsync", "disk is full (ENOSPC)"),
        ("full at close", "disk is full (ENOSPC)"),
        ("unwritable", "is not writable"),
        ("read-only file system", "is not writable"),
    ],
)
def test_checkpoint_write_failure_stops_clearly_and_keeps_the_previous_checkpoint(
    kind: str, reason: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, uninterrupted: dict, ledger
) -> None:
    run_dir = tmp_path / "run"
    manager = CheckpointManager(run_dir)
    handlers = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS}
    with monkeypatch.context() as patch:
        fault = DiskFault(patch, kind)
        with pytest.raises(CheckpointWriteError) as info:
            in_process_run(RUN + [f"run_dir={run_dir}"])
    message = str(info.value)
    # The failed run put back the signal handlers it replaced and logged why it stopped.
    restored = {sig: signal.getsignal(sig) for sig in PREEMPTION_SIGNALS} == handlers
    logged = (run_dir / "log.txt").read_text().splitlines()[-1].startswith("run stopped by CheckpointWriteError")
    previous = manager.path_for(FAILING_STEP - 2)
    intact = fault.previous is not None and previous.read_bytes() == fault.previous
    clean = [p.name for p in manager.all()] == [previous.name] and temp_files(run_dir) == []
    clear = str(manager.path_for(FAILING_STEP)) in message and reason in message
    resumed = in_process_run(RUN + [f"run_dir={run_dir}"])  # space freed / permissions back: restart
    diff = same_training_state(load_final(run_dir), uninterrupted)
    ledger.record(
        f"disk: {kind}",
        intact
        and clean
        and clear
        and restored
        and logged
        and diff == []
        and "resumed from" in (run_dir / "log.txt").read_text(),
        0 if diff == [] else 1,
    )
    assert clear, message
    assert restored and logged
    assert intact, f"{previous} changed ({fault.mechanism})"
    assert clean, sorted(p.name for p in run_dir.iterdir())
    assert resumed["progress"]["step"] == 6
    assert f"steps {FAILING_STEP - 2} → 6; resumed from {previous}" in (run_dir / "log.txt").read_text()
    assert diff == [], diff[:5]


def _rank(rank: int, run_dir: Path, out_dir: Path) -> None:
    """A rank of a 2-process run whose rank 0 finds the disk full at the second checkpoint. Rank 0
    then stays alive until rank 1 has reported (as a launcher that catches the error would), so a
    rank left waiting at a collective shows up as a hang (the watchdog ends it with SIGALRM)."""
    watchdog(60)
    torch.set_num_threads(1)
    from tvm.config import compose_config
    from tvm.train.loop import run

    def torch_save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    real_save = CheckpointManager.save

    def save(manager: CheckpointManager, state: Any, step: int) -> Path:
        if step == FAILING_STEP:
            ckpt.torch.save = torch_save
        return real_save(manager, state, step)

    CheckpointManager.save = save
    started = time.monotonic()
    try:
        run(compose_config("tiny", RUN + [f"run_dir={run_dir}"]))
        record = {"error": None}
    except CheckpointWriteError as exc:
        record = {"error": str(exc), "errno": exc.errno, "type": type(exc).__name__}
    record["seconds"] = time.monotonic() - started
    (out_dir / f"rank{rank}.json").write_text(json.dumps(record))
    if rank == 0:
        deadline = time.monotonic() + 50
        while not (out_dir / "rank1.json").exists() and time.monotonic() < deadline:
            time.sleep(0.05)


def test_disk_full_on_rank_0_stops_every_rank_with_the_same_clear_error(tmp_path: Path, ledger) -> None:
    run_dir = tmp_path / "run"
    fork_ranks(lambda rank: _rank(rank, run_dir, tmp_path), world_size=2, timeout=90)
    records = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    path = str(CheckpointManager(run_dir).path_for(FAILING_STEP))
    ok = all(
        r["error"] and path in r["error"] and "disk is full" in r["error"] and r["errno"] == errno.ENOSPC
        for r in records
    )
    previous = CheckpointManager(run_dir).path_for(FAILING_STEP - 2)
    ledger.record("disk: full on rank 0 of 2", ok and ckpt.load_checkpoint(previous)["progress"]["step"] == 2)
    assert ok, records
    assert records[1]["error"].startswith(f"rank 0 could not write checkpoint {path}")
    assert [p.name for p in CheckpointManager(run_dir).all()] == [previous.name] and temp_files(run_dir) == []
