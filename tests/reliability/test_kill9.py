"""Fault 1: ``kill -9`` of a training process at random moments, some during a checkpoint write.

Documented outcome (README "One run, one directory", tvm/runtime/checkpoint.py): after a kill the run
directory holds only complete, loadable checkpoints (the newest is at most one checkpoint interval
behind the killed process), and restarting on the directory continues from the newest one; a chain
of killed and restarted processes ends with exactly the weights, optimizer state and data position
of an uninterrupted run.

The SIGKILL moments come from a seeded generator: 16 uniform in the first 1.5 s of a process (start-
up, steps, tick maintenance, checkpoint writes) and 8 inside a checkpoint write, made to last
~0.3 s by a slow disk (a kill can then land before the rename, with a torn temporary file, or just
after it).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from fault_tools import (
    INTERVAL,
    LAUNCHER_VARS,
    RUN,
    TOTAL_STEPS,
    IDLE,
    Probe,
    child_log,
    latest_step,
    load_every_checkpoint,
    load_final,
    same_training_state,
    start_training,
    stats_lines_parse,
    temp_files,
    wait_for,
)

ROOT = Path(__file__).resolve().parents[2]
RANDOM_KILLS = 16
WRITE_KILLS = 8
SLOW_DISK = 0.2  # seconds per MB: a checkpoint of the quick config (1.5 MB) takes ~0.3 s to write


def _finish_chain(run_dir: Path, out: Path, reference: dict) -> list[str]:
    """Restart once more without a fault and compare the end of the chain with the reference run."""
    proc = start_training(RUN + [f"run_dir={run_dir}"], Probe.new(latest_step(run_dir)), out)
    proc.join(timeout=180)
    assert proc.exitcode == 0, child_log(out)
    assert temp_files(run_dir) == [], "a completed write must clear the leftovers of interrupted ones"
    return same_training_state(load_final(run_dir), reference)


def test_kill_9_at_random_moments_loses_at_most_one_interval(tmp_path: Path, reference: dict, ledger) -> None:
    rng = random.Random(20261122)
    kinds = ["random"] * RANDOM_KILLS + ["write"] * WRITE_KILLS
    rng.shuffle(kinds)
    chain, run_dir = 0, tmp_path / "chain0"
    out = tmp_path / "child"
    during_write, redone, problems = 0, 0, []
    trial = 0
    for _attempt in range(10 * (RANDOM_KILLS + WRITE_KILLS)):  # bounded, whatever the machine's speed
        if not kinds:
            break
        kind = kinds[0]
        start = latest_step(run_dir)
        probe = Probe.new(start)
        proc = start_training(RUN + [f"run_dir={run_dir}"], probe, out, SLOW_DISK if kind == "write" else None)
        if kind == "random":
            proc.join(timeout=rng.uniform(0.05, 1.5))
        else:
            assert wait_for(lambda: probe.saving.value != IDLE, 60, proc) or not proc.is_alive(), child_log(out)
            proc.join(timeout=rng.uniform(0.0, 0.25))
        if proc.is_alive():
            os.kill(proc.pid, signal.SIGKILL)
            proc.join(timeout=30)
        if proc.exitcode == 0:  # the run ended before the kill: a completed chain, not a fault trial
            assert latest_step(run_dir) == TOTAL_STEPS
            diff = same_training_state(load_final(run_dir), reference)
            assert diff == [], f"chain {chain} differs from the uninterrupted run: {diff[:5]}"
            chain += 1
            run_dir = tmp_path / f"chain{chain}"
            continue
        kinds.pop(0)
        trial += 1
        assert proc.exitcode == -signal.SIGKILL, child_log(out)
        done, stage = probe.steps.value, probe.saving.value
        during_write += stage != IDLE
        on_disk = load_every_checkpoint(run_dir)  # every file under a final name is complete
        newest = max(on_disk, default=0)
        lost = done - newest  # steps the restart redoes
        ok = 0 <= lost <= INTERVAL and stats_lines_parse(run_dir)
        ledger.record(
            "kill -9: at a random moment" if kind == "random" else "kill -9: during a checkpoint write",
            ok,
            max(0, lost - INTERVAL),
        )
        redone += max(0, lost)
        if not ok:
            problems.append(
                f"trial {trial} ({kind}): {done} steps done, newest checkpoint {newest}, "
                f"stats.jsonl parses: {stats_lines_parse(run_dir)}"
            )
    assert kinds == [], f"only {trial} kills: the runs kept ending before the kill"
    diff = _finish_chain(run_dir, out, reference)
    assert diff == [], f"the last chain differs from the uninterrupted run: {diff[:5]}"
    assert problems == [], problems
    # The slow disk must have put most of the write trials inside a write (else the test tests less).
    assert during_write >= WRITE_KILLS // 2, f"only {during_write} kills landed inside a checkpoint write"
    ledger.note(
        f"kill -9: {trial} kills ({during_write} inside a checkpoint write), {chain + 1} chains of restarts "
        f"each equal to the uninterrupted run, {redone} steps redone in total (at most {INTERVAL} per kill)"
    )


def _status_step(run_dir: Path) -> int:
    """The step of the last status line in ``log.txt`` (``tick 3  step 6  ...``), 0 before the first."""
    path = run_dir / "log.txt"
    lines = path.read_text().splitlines() if path.exists() else []
    return max([int(line.split()[3]) for line in lines if line.startswith("tick ")], default=0)


def test_kill_9_of_train_py(tmp_path: Path, reference: dict, ledger) -> None:
    """The same fault through the real entry point: ``python train.py`` (Hydra, process start) killed
    at a random moment after its first checkpoint, then continued on the same run directory."""
    rng = random.Random(7)
    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS} | {
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
    }
    command = [sys.executable, "train.py", "--config-name=tiny", *RUN, f"run_dir={run_dir}"]
    with open(tmp_path / "train.log", "w") as log:
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        target = rng.randint(INTERVAL + 1, TOTAL_STEPS - 10)  # a random step after the first checkpoint
        try:
            wait_for(lambda: _status_step(run_dir) >= target or proc.poll() is not None, 180)
            time.sleep(rng.uniform(0.0, 0.05))
        finally:
            proc.kill()  # SIGKILL
            proc.wait(timeout=30)
    killed = proc.returncode == -signal.SIGKILL
    on_disk = load_every_checkpoint(run_dir)
    newest = max(on_disk)
    done = _status_step(run_dir)  # the last status line: a lower bound of the steps done
    diff = _finish_chain(run_dir, tmp_path / "child", reference)
    resumed = f"resumed from {run_dir}" in (run_dir / "log.txt").read_text()
    ok = killed and done - newest <= INTERVAL and diff == [] and resumed
    ledger.record("kill -9: python train.py at a random moment", ok, max(0, done - newest - INTERVAL))
    assert killed, "train.py finished before the kill (make the run longer)"
    assert done - newest <= INTERVAL, (done, newest)
    assert diff == [], diff[:5]
