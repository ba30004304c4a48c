"""Fault 2: the preemption signals — SIGUSR2 (submitit's warning), SIGUSR1 (``--signal`` set-ups),
SIGTERM (``scancel``, preemption) — and SIGINT (Ctrl-C), which stops the same way.

Documented outcome (tvm/train/preemption.py, README): the process writes a checkpoint at the step
where the ranks agree to stop, exits cleanly (exit code 0, ``run`` returns ``preempted=True`` naming
the signal), loses no step, and the requeued continuation — the same command on the same run
directory — ends exactly where the uninterrupted run ends.

Each signal is delivered twice per run at moments drawn from a seeded generator: once at a random
moment of the first 12 steps after a (re)start, and once (twice in a row, as Slurm may repeat it; not SIGINT,
whose second delivery aborts at once) while a checkpoint is being written on a slow disk; then the run is
continued to its end. ``tests/train/test_multinode.py``
covers SIGUSR2 through ``train.py`` and the submitit requeue; this file covers all three signals at
random moments with zero loss.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from fault_tools import (
    RUN,
    TOTAL_STEPS,
    IDLE,
    Probe,
    child_log,
    child_result,
    latest_step,
    load_every_checkpoint,
    load_final,
    same_training_state,
    start_training,
    wait_for,
)

SLOW_DISK = 0.2  # seconds per MB (a checkpoint write then takes ~0.3 s)


@pytest.mark.parametrize("sig", [signal.SIGUSR2, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT], ids=lambda s: s.name)
def test_signal_checkpoints_exits_cleanly_and_the_continuation_equals_the_uninterrupted_run(
    sig: signal.Signals, tmp_path: Path, reference: dict, ledger
) -> None:
    rng = random.Random(int(sig))
    run_dir, out = tmp_path / "run", tmp_path / "child"
    stops = []
    for moment in ("a random moment", "a checkpoint write"):
        start = latest_step(run_dir)
        probe = Probe.new(start)
        slow_disk = SLOW_DISK if moment == "a checkpoint write" else None
        proc = start_training(RUN + [f"run_dir={run_dir}"], probe, out, slow_disk)
        # The loop's handler is installed before the first step; a signal during start-up takes the
        # launcher's path instead (submitit requeues at once; nothing to lose before the first step).
        assert wait_for(lambda: probe.steps.value > start, 60, proc), child_log(out)
        if moment == "a random moment":  # within a random step (a time bound would depend on the machine)
            target = start + rng.randint(1, 12)
            assert wait_for(lambda: probe.steps.value >= target, 60, proc), child_log(out)
            time.sleep(rng.uniform(0.0, 0.03))
            os.kill(proc.pid, sig)
        else:
            assert wait_for(lambda: probe.saving.value != IDLE, 60, proc), child_log(out)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(proc.pid, sig)
            if sig != signal.SIGINT:  # a second Ctrl-C aborts (tests/train/test_preemption.py)
                time.sleep(0.01)
                os.kill(proc.pid, sig)  # a repeated warning changes nothing
        proc.join(timeout=120)
        result = child_result(out)
        on_disk = load_every_checkpoint(run_dir)
        done = probe.steps.value
        ok = (
            proc.exitcode == 0
            and result is not None
            and result["preempted"]
            and result["signal"] == sig.name
            and max(on_disk) == done == result["progress"]["step"] < TOTAL_STEPS
            and f"on {sig.name}: checkpoint written" in (run_dir / "log.txt").read_text()
        )
        ledger.record(f"signal: {sig.name} at {moment}", ok, done - max(on_disk, default=0))
        assert ok, (proc.exitcode, result, sorted(on_disk), done, child_log(out))
        stops.append(done)
    proc = start_training(RUN + [f"run_dir={run_dir}"], Probe.new(latest_step(run_dir)), out)  # the requeued job
    proc.join(timeout=180)
    assert proc.exitcode == 0 and not child_result(out)["preempted"], child_log(out)
    assert f"steps {stops[-1]} → {TOTAL_STEPS}" in (run_dir / "log.txt").read_text()
    diff = same_training_state(load_final(run_dir), reference)
    assert diff == [], f"continuation after {sig.name} at steps {stops} differs: {diff[:5]}"
