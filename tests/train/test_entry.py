"""How train.py and train.sh end (tvm/train/entry.py): the one-line cause of a failure is the last line
on stderr, without a traceback; a Ctrl-C through train.sh stops every worker with a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import QUICK_TINY
from tvm.train import entry
from tvm.runtime.checkpoint import CheckpointManager, checkpoint_step

ROOT = Path(__file__).resolve().parents[2]
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env() -> dict[str, str]:
    """This environment without launcher variables (the tests may run inside Slurm or torchrun)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_", "TVM_"))
        and k not in LAUNCHER_VARS
        and k != "HYDRA_FULL_ERROR"
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def last_stderr_line(proc: subprocess.CompletedProcess) -> str:
    lines = proc.stderr.strip().splitlines()
    return lines[-1] if lines else ""


@pytest.mark.parametrize(
    "overrides, cause",
    [
        (
            ["training.bogus=1"],
            "train.py: error: Could not override 'training.bogus': Key 'bogus' not in 'TrainingConfig'",
        ),
        (
            ["training.resume={tmp}/bad.pt"],
            "train.py: error: cannot load checkpoint {tmp}/bad.pt: not a torch zip archive "
            "(truncated, corrupt, or not a checkpoint)",
        ),
    ],
)
def test_train_py_ends_with_the_one_line_cause(tmp_path, overrides, cause):
    """A composition error (Hydra's) and a run-time one (the trainer's); the others are the same path
    (``+key``, values, dataset, batch: tests/test_config.py, tests/train/test_loop.py)."""
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    overrides = [o.format(tmp=tmp_path) for o in overrides]
    proc = subprocess.run(
        [sys.executable, "train.py", "--config-name=tiny", *QUICK_TINY, *overrides, f"run_dir={tmp_path / 'run'}"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert last_stderr_line(proc) == cause.format(tmp=tmp_path)
    assert "Traceback" not in proc.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize(
    "args, cause",
    [
        (["0", "tiny"], "NUM_GPUS must be a positive integer (processes on this machine), got '0'"),
        (["two", "tiny"], "NUM_GPUS must be a positive integer (processes on this machine), got 'two'"),
        (["2"], "expected NUM_GPUS and CONFIG, got 1 argument(s)"),
    ],
)
def test_train_sh_refuses_a_bad_gpu_count_before_torchrun(args, cause):
    proc = subprocess.run(
        ["bash", "train.sh", *args], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "usage: bash train.sh NUM_GPUS CONFIG [overrides ...]",
        f"train.sh: error: {cause}",
    ]


@pytest.mark.slow
def test_train_sh_ends_with_the_workers_cause_after_torchrun_report(tmp_path):
    """Two torchrun workers fail on a batch that does not split; torchrun's report (a traceback of its
    own and a failure table) comes first, the cause last."""
    proc = subprocess.run(
        ["bash", "train.sh", "2", "tiny", *QUICK_TINY, "training.batch_size=15", f"run_dir={tmp_path}"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-2:] == [
        "train.sh: torchrun exited with code 1",
        "train.py: error: training.batch_size=15 is not divisible by the world size 2",
    ]


@pytest.mark.slow
def test_ctrl_c_through_train_sh_checkpoints_every_rank_and_exits_cleanly(tmp_path):
    """SIGINT to train.sh reaches both workers once: they agree on a step, write its checkpoint and
    exit 0 (so does torchrun, which is not signalled itself); the same command continues the run."""
    run_dir = tmp_path / "run"
    total = 400
    command = [
        "bash",
        "train.sh",
        "2",
        "tiny",
        *QUICK_TINY,
        f"training.total_ticks={total // 2}",
        "training.ckpt_ticks=1000",
        "training.snapshot_ticks=1000",
        "training.preempt_check_steps=2",
        f"run_dir={run_dir}",
    ]
    proc = subprocess.Popen(
        command,
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # A shell started with SIGINT ignored cannot trap it (POSIX), and a test suite launched in the
        # background by a non-interactive shell (`bash .ci/run &`) passes that on: train.sh as a user
        # starts it at a terminal, with the default action.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 120
    log = run_dir / "log.txt"
    while not (log.exists() and " step 4 " in log.read_text()):  # training is under way on both ranks
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "no training steps after 120 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    steps = [checkpoint_step(p) for p in CheckpointManager(run_dir).all()]
    assert len(steps) == 1 and 4 <= steps[0] < total and steps[0] % 2 == 0, steps
    assert f"stopping at step {steps[0]} on SIGINT: checkpoint written" in log.read_text()
    assert out.strip().splitlines()[-1] == (
        f"train.py: stopped at step {steps[0]} on SIGINT with a checkpoint in "
        f"{run_dir}; run the same command to continue"
    )
    assert "SIGINT: stopping at the next step boundary with a checkpoint" in err  # rank 0's notice
    assert "Traceback" not in err


def test_entry_point_reports_bugs_with_their_traceback_and_interrupts_with_130(capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)
    monkeypatch.setenv(entry.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("RANK", "3")

    def bug():
        raise KeyError("weights")

    assert entry.run_entry_point(bug, "train.py") == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1] == "train.py: error: KeyError: 'weights'"
    assert (tmp_path / "rank00003.txt").read_text() == "train.py: error: KeyError: 'weights'\n"

    def interrupted():
        raise KeyboardInterrupt

    assert entry.run_entry_point(interrupted, "train.py") == entry.INTERRUPTED_EXIT
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("train.py: interrupted: stopped at once")
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # the user asked for Python's traceback
    with pytest.raises(KeyError):
        entry.run_entry_point(bug, "train.py")


def test_one_line_joins_multi_line_messages():
    assert entry.one_line(ValueError("a\n  b")) == "a b"
    assert entry.one_line(RuntimeError("")) == "RuntimeError"
    assert entry.outcome_line("train.py", {"preempted": False}) is None
