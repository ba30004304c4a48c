"""Shared tools of the fault-injection suite: a short training configuration, forked training
processes that report their progress through shared memory (so that the parent can kill them with
SIGKILL and still know how many steps they had completed), a slow disk, host-read counting, and
comparisons of training states.

Forked children (``multiprocessing`` "fork" context) start training in well under a second because
torch, Hydra and the package are already imported; they run the same ``tvm.train.loop.run`` that
``train.py`` calls. Everything a child patches dies with it.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.runtime.checkpoint import CheckpointManager, checkpoint_step, load_checkpoint

STEPS_PER_TICK = 2  # QUICK_TINY: 32 images per tick at batch 16
CKPT_TICKS = 2
INTERVAL = STEPS_PER_TICK * CKPT_TICKS  # steps between two checkpoints
TOTAL_STEPS = 40
RUN = QUICK_TINY + [
    f"training.ckpt_ticks={CKPT_TICKS}",
    "training.snapshot_ticks=1000",
    "training.keep_last=2",
    f"training.total_ticks={TOTAL_STEPS // STEPS_PER_TICK}",
    f"training.preempt_check_steps={STEPS_PER_TICK}",
]
LAUNCHER_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "TORCHELASTIC_RUN_ID",
)
_REPO = Path(__file__).resolve().parents[2]
COMPARED = ("net", "ema", "ema_target", "optimizer", "progress", "data")  # not rng (global
# Python/NumPy generators are not seeded by a run) and not config (it names the run directory)


@contextlib.contextmanager
def no_launcher() -> Iterator[None]:
    """This process without any launcher's variables (the tests may themselves run under Slurm)."""
    with pytest.MonkeyPatch.context() as patch:
        for name in LAUNCHER_VARS:
            patch.delenv(name, raising=False)
        yield


def in_process_run(overrides: Sequence[str]) -> dict[str, Any]:
    """``tvm.train.loop.run`` on the tiny config with ``overrides``, in this process."""
    from tvm.train.loop import run

    with no_launcher():
        return run(compose_config("tiny", list(overrides)))


def latest_step(run_dir: Path) -> int:
    """Step of the newest checkpoint in ``run_dir`` (0 when there is none)."""
    path = CheckpointManager(run_dir).latest()
    return 0 if path is None else checkpoint_step(path)


def load_final(run_dir: Path) -> dict:
    """The newest checkpoint of ``run_dir``, fully loaded."""
    path = CheckpointManager(run_dir).latest()
    assert path is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(path)


def load_every_checkpoint(run_dir: Path) -> dict[int, dict]:
    """Every ``checkpoint-*.pt`` of ``run_dir`` fully loaded (any torn file raises), by step."""
    loaded = {}
    for path in CheckpointManager(run_dir).all():
        content = load_checkpoint(path)
        assert content["progress"]["step"] == checkpoint_step(path), path
        loaded[checkpoint_step(path)] = content
    return loaded


def temp_files(run_dir: Path) -> list[Path]:
    """Leftovers of interrupted checkpoint writes."""
    return sorted(run_dir.glob(".checkpoint-*.tmp")) if run_dir.is_dir() else []


def stats_lines_parse(run_dir: Path) -> bool:
    """Every line of ``stats.jsonl`` is complete JSON (a kill must not tear a line)."""
    path = run_dir / "stats.jsonl"
    if not path.exists():
        return True
    try:
        for line in path.read_text().splitlines():
            json.loads(line)
    except json.JSONDecodeError:
        return False
    return True


def differences(a: Any, b: Any, where: str = "") -> list[str]:
    """Where two checkpoint contents differ (tensors compared exactly, dtypes included)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        same = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
        return [] if same else [where]
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return [f"{where} keys {sorted(map(str, a.keys() ^ b.keys()))}"]
        return [d for key in a for d in differences(a[key], b[key], f"{where}[{key!r}]")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    return [] if a == b else [f"{where}: {a!r} != {b!r}"]


def same_training_state(a: dict, b: dict) -> list[str]:
    """Differences between two checkpoints in everything that determines the rest of the run."""
    return [d for key in COMPARED for d in differences(a.get(key), b.get(key), key)]


def all_finite(content: dict) -> bool:
    """No NaN/inf in the weights of a checkpoint (online net, eval EMA, teacher)."""
    return all(torch.isfinite(t).all() for name in ("net", "ema", "ema_target") for t in content[name].values())


# ---------------------------------------------------------------------------------------------
# Forked training processes
# ---------------------------------------------------------------------------------------------

IDLE, WRITING, RENAMED = 0, 1, 2  # Probe.saving: where a checkpoint write stands


@dataclass
class Probe:
    """Shared memory that a forked training child updates and the parent reads, also after SIGKILL.

    ``steps``: optimizer steps completed (absolute, counting from the checkpoint it resumed from);
    ``saving``: ``WRITING`` from the start of ``CheckpointManager.save`` to the rename onto the final
    name, ``RENAMED`` from the rename until ``save`` returns, ``IDLE`` otherwise;
    ``writes``: checkpoint writes started.
    """

    steps: Any
    saving: Any
    writes: Any

    @classmethod
    def new(cls, start_step: int = 0) -> Probe:
        ctx = multiprocessing.get_context("fork")
        probe = cls(ctx.RawValue("q", 0), ctx.RawValue("i", IDLE), ctx.RawValue("i", 0))
        probe.steps.value = start_step
        return probe


class FileWrapper:
    """An open file whose methods subclasses replace to inject a fault; the rest pass through, and
    leaving its ``with`` block closes the file."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def __getattr__(self, name: str) -> Any:
        return getattr(self._handle, name)

    def __enter__(self) -> FileWrapper:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._handle.close()


class SlowFile(FileWrapper):
    """A file whose writes take ``seconds_per_mb`` (a slow or remote disk), so that a checkpoint
    write lasts long enough for a kill or a signal to land inside it."""

    def __init__(self, handle: Any, seconds_per_mb: float) -> None:
        super().__init__(handle)
        self._delay = seconds_per_mb / 2**20

    def write(self, data: bytes) -> int:
        time.sleep(len(data) * self._delay)
        return self._handle.write(data)


def _instrument(probe: Probe, slow_disk_s_per_mb: float | None) -> None:
    """Patch this (child) process so that it reports progress and checkpoint writes to ``probe``."""
    import tvm.train.loop as loop
    from tvm.runtime import checkpoint

    real_apply, real_restore, real_save = loop.apply_update, loop.restore, CheckpointManager.save
    real_replace = os.replace

    def apply_update(*args: Any, **kwargs: Any) -> Any:
        update = real_apply(*args, **kwargs)
        probe.steps.value += 1
        return update

    def restore(state: Any, ckpt: dict, *args: Any, **kwargs: Any) -> None:
        real_restore(state, ckpt, *args, **kwargs)
        probe.steps.value = int(ckpt["progress"]["step"])

    def save(self: CheckpointManager, state: Any, step: int) -> Path:
        probe.writes.value += 1
        probe.saving.value = WRITING
        try:
            return real_save(self, state, step)
        finally:
            probe.saving.value = IDLE

    def replace(src: Any, dst: Any) -> None:
        real_replace(src, dst)
        if probe.saving.value == WRITING:
            probe.saving.value = RENAMED

    loop.apply_update, loop.restore, CheckpointManager.save = apply_update, restore, save
    os.replace = replace
    if slow_disk_s_per_mb:
        checkpoint.open = lambda *args, **kwargs: SlowFile(open(*args, **kwargs), slow_disk_s_per_mb)


def _train_child(overrides: list[str], probe: Probe, slow_disk_s_per_mb: float | None, out: str) -> None:
    """Body of a forked training process: output to ``<out>.log``, result to ``<out>.json``."""
    log = os.open(f"{out}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    for name in LAUNCHER_VARS:
        os.environ.pop(name, None)
    for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)  # as in a fresh process, whatever the parent installed
    signal.signal(signal.SIGINT, signal.default_int_handler)
    torch.set_num_threads(1)
    _instrument(probe, slow_disk_s_per_mb)
    from tvm.train.loop import run

    result = run(compose_config("tiny", overrides))
    Path(f"{out}.json").write_text(json.dumps(result, default=str))


def start_training(
    overrides: Sequence[str], probe: Probe, out: Path, slow_disk_s_per_mb: float | None = None
) -> multiprocessing.Process:
    """Fork a process that trains with ``overrides`` and reports to ``probe`` (see ``_train_child``)."""
    Path(f"{out}.json").unlink(missing_ok=True)
    proc = multiprocessing.get_context("fork").Process(
        target=_train_child, args=(list(overrides), probe, slow_disk_s_per_mb, str(out))
    )
    proc.start()
    return proc


def child_result(out: Path) -> dict | None:
    """What a finished child's ``run`` returned (None if it did not return)."""
    path = Path(f"{out}.json")
    return json.loads(path.read_text()) if path.exists() else None


def child_log(out: Path, tail: int = 3000) -> str:
    path = Path(f"{out}.log")
    return path.read_text(errors="replace")[-tail:] if path.exists() else ""


def wait_for(condition: Any, timeout: float, proc: multiprocessing.Process | None = None) -> bool:
    """Poll ``condition()`` every millisecond until true, the timeout, or the process's end."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline or (proc is not None and not proc.is_alive()):
            return bool(condition())
        time.sleep(0.001)
    return True


# ---------------------------------------------------------------------------------------------
# Host reads
# ---------------------------------------------------------------------------------------------

HOST_READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__")


class HostReadCounter:
    """Counts the tensor methods that copy a value to the host (on a GPU each is a synchronisation).

    On the CPU nothing synchronises, so counting these calls is how a test can see a per-step
    synchronisation that a CUDA run would pay for. ``sites`` names the innermost frame of this
    repository's code that made each read (``tvm/method/times.py:94``). ``paused()`` excludes the
    test's own reads.
    """

    def __init__(self) -> None:
        self.count = 0
        self.sites: list[str] = []
        self._active = True

    def _site(self) -> str:
        for frame in reversed(traceback.extract_stack()[:-3]):
            path = Path(frame.filename)
            if _REPO in path.parents and "tests" not in path.relative_to(_REPO).parts[:1]:
                return f"{path.relative_to(_REPO)}:{frame.lineno}"
        return "outside the repository"

    def install(self) -> HostReadCounter:
        for name in HOST_READS:
            original = getattr(torch.Tensor, name)

            def counted(tensor: torch.Tensor, *args: Any, _original: Any = original, **kwargs: Any) -> Any:
                if self._active:
                    self.count += 1
                    self.sites.append(self._site())
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return self

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        active, self._active = self._active, False
        try:
            yield
        finally:
            self._active = active


def watchdog(seconds: int) -> None:
    """End this (forked) process with SIGALRM after ``seconds``: a hang becomes a failed exit code."""
    signal.signal(signal.SIGALRM, signal.SIG_DFL)
    signal.alarm(seconds)
