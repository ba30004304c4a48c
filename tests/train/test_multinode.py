"""Multi-node and preemption, end to end on this machine (CPU, gloo, the tiny quick config).

* two ``torchrun --nnodes=2`` agents meeting through a local c10d rendezvous train like one process
  with the same global batch;
* a run stopped by SIGUSR2 mid-run writes a checkpoint, exits cleanly, and its continuation in the
  same run directory equals an uninterrupted run exactly — both for ``train.py`` and for the
  submitit job that ``launch.py`` submits (run here as Slurm would: the sbatch script's command
  with Slurm's variables, a recording ``scontrol``, then the requeued start).
"""

from __future__ import annotations

import os
import pickle
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from submitit.core.utils import DelayedSubmission
from submitit.slurm.test_slurm import mocked_slurm

import launch
from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint
from tvm.train.slurm import free_port

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
QUICK = QUICK_TINY + ["training.ckpt_ticks=1", "training.snapshot_ticks=1000"]
TOTAL_STEPS = 8  # 4 ticks of 2 steps
# lr 1e-4 (the paper's; tiny uses 1e-3): Adam turns fp32 reduction-order noise in near-zero gradients
# into updates of up to ~lr, so the two-node comparison needs a small lr to hold at fp32 tolerance.
RUN = QUICK + ["training.total_ticks=4", "training.preempt_check_steps=1", "optimizer.lr=1e-4"]
FIRST_CKPT = "checkpoint-00000002.pt"  # end of tick 1: the loop's signal handler is installed by then
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without any launcher's variables (tests may run inside Slurm)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("SLURM_", "SUBMITIT_", "TORCHELASTIC_")) and k not in LAUNCHER_VARS
    }
    return env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)} | extra


def train_cmd(run_dir: Path) -> list[str]:
    return ["train.py", "--config-name=tiny", *RUN, f"run_dir={run_dir}"]


def final(run_dir: Path) -> dict:
    path = CheckpointManager(run_dir).latest()
    assert path is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(path)


def assert_same_weights(a: dict, b: dict, exact: bool) -> None:
    for name in ("net", "ema", "ema_target"):
        assert a[name].keys() == b[name].keys()
        for key in a[name]:
            if exact:
                assert torch.equal(a[name][key], b[name][key]), f"{name}.{key}"
            else:
                torch.testing.assert_close(a[name][key], b[name][key], msg=f"{name}.{key}")  # fp32 defaults


def check(proc: subprocess.CompletedProcess | subprocess.Popen, output: str) -> None:
    assert proc.returncode == 0, output[-4000:]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process, never interrupted (in this process, one thread like the subprocesses)."""
    from tvm.train.loop import run

    run_dir = tmp_path_factory.mktemp("reference")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            for name in LAUNCHER_VARS + ("SLURM_PROCID", "SLURM_NTASKS"):
                patch.delenv(name, raising=False)
            result = run(compose_config("tiny", [*RUN, f"run_dir={run_dir}"]))
    finally:
        torch.set_num_threads(threads)
    assert result["progress"]["step"] == TOTAL_STEPS and not result["preempted"]
    return final(run_dir)


def run_agents(cmd: list[str], logs: list[Path], timeout: float) -> None:
    """Run ``cmd`` once per log file, all at once, each writing to its file; all must exit with 0.

    Past ``timeout`` seconds every process still running is killed. A failure shows every log's tail
    (one agent that fails makes the other wait in torchrun's 300 s exit barrier).
    """
    procs = []
    for log in logs:
        with log.open("w") as out:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=clean_env(), stdout=out, stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
        time.sleep(0.2)
    late = [proc for proc in procs if proc.poll() is None]
    for proc in late:
        proc.kill()
        proc.wait()
    if late or any(proc.returncode for proc in procs):
        tails = (
            f"--- {log.name} (exit {proc.returncode})\n{log.read_text()[-3000:]}" for log, proc in zip(logs, procs)
        )
        codes = [proc.returncode for proc in procs]
        pytest.fail(f"exit codes {codes}, {len(late)} killed after {timeout:.0f} s\n" + "\n".join(tails))


def test_two_nodes_with_c10d_rendezvous_match_one_process(tmp_path, reference):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--nproc_per_node=1",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{port}",
        "--rdzv-id=tvm-two-nodes",
        "--max-restarts=0",
        *train_cmd(tmp_path),
    ]
    run_agents(cmd, [tmp_path / f"agent{node}.log" for node in range(2)], timeout=240)
    assert "world 2 × batch_gpu 8" in (tmp_path / "log.txt").read_text()
    two_nodes = final(tmp_path)
    assert two_nodes["progress"]["step"] == TOTAL_STEPS
    assert_same_weights(two_nodes, reference, exact=False)


def interrupt_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path, sig=signal.SIGUSR2) -> str:
    deadline = time.monotonic() + 240
    while not (run_dir / FIRST_CKPT).exists():
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.02)
    proc.send_signal(sig)
    return proc.communicate(timeout=240)[0]


def test_train_py_preempted_then_continued_equals_uninterrupted(tmp_path, reference):
    proc = subprocess.Popen(
        [sys.executable, *train_cmd(tmp_path)],
        cwd=ROOT,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = interrupt_after_first_checkpoint(proc, tmp_path)
    check(proc, output)
    assert "on SIGUSR2" in output
    stopped = final(tmp_path)["progress"]["step"]
    assert 2 <= stopped < TOTAL_STEPS
    proc = subprocess.run(
        [sys.executable, *train_cmd(tmp_path)], cwd=ROOT, env=clean_env(), capture_output=True, text=True, timeout=300
    )  # the requeued job: same command, same run dir
    check(proc, proc.stdout + proc.stderr)
    assert f"steps {stopped} → {TOTAL_STEPS}" in (tmp_path / "log.txt").read_text()
    assert_same_weights(final(tmp_path), reference, exact=True)


def test_slurm_job_preempted_requeued_and_resumed_equals_uninterrupted(tmp_path, reference):
    run_dir, folder = tmp_path / "run", tmp_path / "run" / "submitit"
    with mocked_slurm():
        assert launch.main(["--ngpus=1", "--config-name=tiny", *RUN, f"run_dir={run_dir}"]) == 0
    script = (folder / "12_submission.sh").read_text()
    srun_line = shlex.split(script.strip().splitlines()[-1])
    task_cmd = srun_line[srun_line.index("-u") - 1 :]  # what srun starts in each task
    assert task_cmd[1:] == ["-u", "-m", "submitit.core._submit", str(folder)]
    bin_dir, requeues = tmp_path / "bin", tmp_path / "scontrol.log"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f'#!/bin/sh\necho "$@" >> {requeues}\n')
    (bin_dir / "scontrol").chmod(0o755)
    env = clean_env(
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        SUBMITIT_EXECUTOR="slurm",
        SLURM_JOB_ID="12",
        SLURM_PROCID="0",
        SLURM_NTASKS="1",
        SLURM_LOCALID="0",
        SLURM_NODEID="0",
        SLURM_JOB_NUM_NODES="1",
        SLURM_JOB_NODELIST="localhost",
    )

    task = subprocess.Popen(task_cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = interrupt_after_first_checkpoint(task, run_dir)  # Slurm's --signal=USR2@delay
    assert task.returncode == 255, log[-4000:]  # submitit's exit after requeueing
    assert requeues.read_text().split() == ["requeue", "12"]
    assert "handing over to submitit" in log and "Requeued job 12" in log
    stopped = final(run_dir)["progress"]["step"]
    assert 2 <= stopped < TOTAL_STEPS
    assert DelayedSubmission.load(folder / "12_submitted.pkl").function.starts == 1

    task = subprocess.run(task_cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)  # requeued
    log = task.stdout + task.stderr  # (srun would write these to the submitit folder)
    check(task, log)
    assert "start 2 of this job" in log and requeues.read_text().split() == ["requeue", "12"]
    outcome, result = pickle.loads((folder / "12_0_result.pkl").read_bytes())
    assert outcome == "success" and result["progress"]["step"] == TOTAL_STEPS and not result["preempted"]
    assert_same_weights(final(run_dir), reference, exact=True)


def test_loop_reports_which_signal_stopped_it(tmp_path, monkeypatch):
    """The job requeues on SIGUSR1/SIGUSR2 but not on SIGTERM (scancel): the loop must say which."""
    from tvm.train.loop import run

    for name in LAUNCHER_VARS + ("SLURM_PROCID", "SLURM_NTASKS"):
        monkeypatch.delenv(name, raising=False)
    previous = signal.signal(signal.SIGTERM, lambda *_: None)  # a late signal must not end pytest

    def send_when_checkpointed():
        deadline = time.monotonic() + 120
        while not (tmp_path / FIRST_CKPT).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    sender = threading.Thread(target=send_when_checkpointed, daemon=True)
    sender.start()
    try:
        result = run(compose_config("tiny", [*RUN, f"run_dir={tmp_path}"]))
    finally:
        sender.join(timeout=130)
        signal.signal(signal.SIGTERM, previous)
    assert result["preempted"] and result["progress"]["step"] < TOTAL_STEPS
    assert result.get("signal") == "SIGTERM"
