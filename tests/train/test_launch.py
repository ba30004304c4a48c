"""launch.py and tvm/train/slurm.py: what is submitted to Slurm (submitit's mocked Slurm), the
preemption hand-over to submitit's checkpoint/requeue, in-process with a stand-in trainer, and a real
two-process local launch."""

from __future__ import annotations

import os
import pickle
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import submitit
from submitit.core import job_environment
from submitit.core.utils import DelayedSubmission, JobPaths
from submitit.slurm.test_slurm import mocked_slurm

import launch
from tvm.train import slurm
from tvm.train.slurm import SlurmOptions, TrainJob, slurm_parameters, split_train_args

ROOT = Path(__file__).resolve().parents[2]


def submit_mocked(tmp_path: Path, *argv: str) -> tuple[str, TrainJob]:
    """Run ``launch.main`` against submitit's mocked Slurm; return the sbatch script and the job."""
    with mocked_slurm():
        assert launch.main([*argv, f"run_dir={tmp_path / 'run'}"]) == 0
    folder = tmp_path / "run" / "submitit"
    script = (folder / "12_submission.sh").read_text()  # the mock's first job id is 12
    delayed = DelayedSubmission.load(folder / "12_submitted.pkl")
    return script, delayed.function


def sbatch_flags(script: str) -> dict[str, str | None]:
    flags = {}
    for line in script.splitlines():
        if match := re.fullmatch(r"#SBATCH --([\w-]+)(?:=(.*))?", line):
            flags[match.group(1)] = match.group(2)
    return flags


def test_multi_node_submission(tmp_path):
    script, job = submit_mocked(
        tmp_path,
        "--ngpus=8",
        "--nodes=4",
        "--partition=gpu",
        "--account=proj",
        "--qos=high",
        "--constraint=h100",
        "--timeout-min=720",
        "--cpus-per-task=12",
        "--mem-gb=900",
        "--job-name=im256",
        "--signal-delay-s=240",
        "--config-name=tiny",
        "training.batch_size=64",
        "loss.cfg=2.0",
    )
    flags = sbatch_flags(script)
    assert flags["nodes"] == "4" and flags["ntasks-per-node"] == "8" and flags["gres"] == "gpu:8"
    assert flags["signal"] == "USR2@240"  # submitit's preemption warning
    assert "requeue" in flags and flags["requeue"] is None
    assert flags["time"] == "720" and flags["cpus-per-task"] == "12" and flags["mem"] == "900GB"
    assert flags["partition"] == "gpu" and flags["account"] == "proj" and flags["qos"] == "high"
    assert flags["constraint"] == "h100" and flags["job-name"] == "im256"
    folder = tmp_path / "run" / "submitit"
    command = script.strip().splitlines()[-1]
    assert command.startswith("srun --unbuffered --output ")
    assert command.endswith(f"-u -m submitit.core._submit {folder}")
    assert "export SUBMITIT_EXECUTOR=slurm" in script
    assert "NCCL" not in script
    # the pickled job: train.py's arguments, run from the submission directory
    assert isinstance(job, TrainJob)
    assert job.train_args == [
        "--config-name=tiny",
        "training.batch_size=64",
        "loss.cfg=2.0",
        f"run_dir={tmp_path / 'run'}",
    ]
    assert job.workdir == os.getcwd() and job.master_port is None


def test_defaults_leave_cluster_values_out(tmp_path):
    script, job = submit_mocked(tmp_path, "--ngpus=2", "--config-name", "tiny")
    flags = sbatch_flags(script)
    for cluster_specific in ("partition", "account", "qos", "constraint", "comment", "exclude"):
        assert cluster_specific not in flags
    defaults = SlurmOptions()
    assert flags["nodes"] == "1" and flags["ntasks-per-node"] == "2" and flags["gres"] == "gpu:2"
    assert flags["signal"] == f"USR2@{defaults.signal_delay_s}" and flags["time"] == str(defaults.timeout_min)
    assert flags["mem"] == "64GB" and flags["job-name"] == "tvm-tiny" and "requeue" in flags
    assert job.train_args[0] == "--config-name"


def test_setup_lines_gpu_type_and_all_memory(tmp_path):
    script, _ = submit_mocked(
        tmp_path,
        "--ngpus=4",
        "--gpu-type=a100",
        "--mem-gb=0",
        "--setup",
        "export NCCL_SOCKET_IFNAME=ib0",
        "--srun-arg=--cpu-bind=none",
        "--config-name=tiny",
    )
    flags = sbatch_flags(script)
    assert flags["gres"] == "gpu:a100:4" and flags["mem"] == "0"
    lines = script.splitlines()
    assert lines.index("export NCCL_SOCKET_IFNAME=ib0") < next(
        i for i, line in enumerate(lines) if line.startswith("srun")
    )
    assert "--cpu-bind=none" in script.strip().splitlines()[-1]  # the srun line


@pytest.mark.parametrize(
    "argv, error, match",
    [
        (["--config-name=tiny", "training.bogus=1"], Exception, "bogus"),
        (["--ngpus=3", "--config-name=tiny"], ValueError, "not divisible by the world size 3"),
        (["--ngpus=2"], ValueError, "no --config-name"),
        (["--ngpus=2", "--config-name=tiny", "--multirun"], ValueError, "unsupported training argument"),
        (["--ngpus=2", "--timeout-min=2", "--signal-delay-s=300", "--config-name=tiny"], ValueError, "signal_delay_s"),
    ],
)
def test_bad_requests_fail_before_anything_is_submitted(tmp_path, argv, error, match):
    with mocked_slurm(), pytest.raises(error, match=match):
        launch.main([*argv, f"run_dir={tmp_path / 'run'}"])
    assert not (tmp_path / "run").exists()


def test_split_train_args():
    assert split_train_args(["--config-name=im256_w2.yaml", "a=1", "+b=2", "~c"]) == ("im256_w2", ["a=1", "+b=2", "~c"])
    assert split_train_args(["-cn", "tiny", "x.y=[1,2]"]) == ("tiny", ["x.y=[1,2]"])
    with pytest.raises(ValueError, match="not a Hydra override"):
        split_train_args(["--config-name=tiny", "stray"])


def test_parameters_are_pure_and_validated():
    params = slurm_parameters(SlurmOptions(nodes=2, ngpus=4))
    assert params["ntasks_per_node"] == 4 and params["nodes"] == 2
    assert params["additional_parameters"] == {"requeue": True}
    assert not {"partition", "account", "qos", "constraint"} & params.keys()
    with pytest.raises(ValueError, match="nodes"):
        slurm_parameters(SlurmOptions(nodes=0))


def test_checkpoint_returns_the_same_job():
    job = TrainJob(["--config-name=tiny"], "/somewhere")
    delayed = job.checkpoint()
    assert isinstance(delayed, DelayedSubmission)
    assert delayed.function is job and delayed.args == () and delayed.kwargs == {}
    assert job.starts == 1
    clone = pickle.loads(pickle.dumps(job))
    assert clone.train_args == job.train_args and clone.starts == 1


# ----------------------------------------------------------------------------- signal hand-over


@pytest.fixture
def job_sandbox():
    """The job changes handlers, the environment (launcher variables) and the working directory:
    put all three back, or a later in-process run would try to join a two-rank group."""
    sigs = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)
    saved = {sig: signal.getsignal(sig) for sig in sigs}
    environ, cwd = dict(os.environ), os.getcwd()
    yield
    for sig, handler in saved.items():
        signal.signal(sig, handler)
    os.environ.clear()
    os.environ.update(environ)
    os.chdir(cwd)


def fake_trainer(signum: signal.Signals | None):
    """Stands in for ``loop.run``: replaces the handlers like the loop, gets ``signum`` mid-run,
    restores the previous (submitit's) handlers and reports a preempted run."""

    def run(cfg):
        assert cfg.name == "tiny"
        got = []
        previous = {s: signal.signal(s, lambda n, f: got.append(n)) for s in (signal.SIGUSR2, signal.SIGTERM)}
        if signum is not None:
            os.kill(os.getpid(), signum)
        for s, handler in previous.items():
            signal.signal(s, handler)
        if signum is not None:
            assert got == [signum]
            return {"preempted": True, "signal": signal.Signals(signum).name, "env": dict(os.environ)}
        return {"preempted": False, "env": dict(os.environ)}

    return run


def run_under_submitit(tmp_path, monkeypatch, trainer, rank: int = 0, executor: str = "slurm"):
    """What ``python -m submitit.core._submit`` does in a task: install submitit's handlers, run."""
    folder = tmp_path / "submitit"
    folder.mkdir(exist_ok=True)
    monkeypatch.setenv("SUBMITIT_FOLDER", str(folder))
    monkeypatch.setenv("SUBMITIT_EXECUTOR", executor)
    if executor == "slurm":
        for key, value in dict(
            SLURM_JOB_ID="77",
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            RANK="5",
            MASTER_PORT="1",
        ).items():
            monkeypatch.setenv(key, value)
    else:
        for key, value in dict(
            SUBMITIT_LOCAL_JOB_ID="4242",
            SUBMITIT_LOCAL_GLOBALID=str(rank),
            SUBMITIT_LOCAL_LOCALID=str(rank),
            SUBMITIT_LOCAL_NTASKS="2",
        ).items():
            monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(submitit.slurm.slurm.subprocess, "check_call", lambda cmd, **kw: calls.append(cmd))
    monkeypatch.setattr(slurm, "_resolve", lambda target: trainer)
    job = TrainJob(["--config-name=tiny"], ROOT, master_port=29999 if executor == "local" else None)
    delayed = DelayedSubmission(job)
    delayed.set_timeout(60, 3)
    env = job_environment.JobEnvironment()
    paths = JobPaths(folder, job_id=env.job_id, task_id=env.global_rank)
    env._handle_signals(paths, delayed)
    return delayed, paths, calls


def test_rank0_checkpoints_then_submitit_requeues(tmp_path, monkeypatch, job_sandbox):
    delayed, paths, calls = run_under_submitit(tmp_path, monkeypatch, fake_trainer(signal.SIGUSR2))
    with pytest.raises(SystemExit):  # submitit exits after `scontrol requeue`
        delayed.result()
    assert calls == [["scontrol", "requeue", "77"]]
    requeued = DelayedSubmission.load(paths.submitted_pickle)  # the pickle the requeued job will run
    assert isinstance(requeued.function, TrainJob) and requeued.function.starts == 1
    assert requeued.function.train_args == ["--config-name=tiny"]


def test_other_ranks_do_not_requeue(tmp_path, monkeypatch, job_sandbox):
    delayed, paths, calls = run_under_submitit(tmp_path, monkeypatch, fake_trainer(signal.SIGUSR2), rank=1)
    result = delayed.result()
    assert result["preempted"] and calls == [] and not paths.submitted_pickle.exists()
    # inside Slurm, stale torchrun variables are dropped so that the trainer reads Slurm's
    assert "RANK" not in result["env"] and "MASTER_PORT" not in result["env"]
    assert result["env"]["SLURM_PROCID"] == "1"


def test_sigterm_checkpoints_without_requeue(tmp_path, monkeypatch, job_sandbox):
    delayed, paths, calls = run_under_submitit(tmp_path, monkeypatch, fake_trainer(signal.SIGTERM))
    result = delayed.result()
    assert result["preempted"] and result["signal"] == "SIGTERM"
    assert calls == [] and not paths.submitted_pickle.exists()


def test_only_the_warning_signals_requeue():
    assert slurm.wants_requeue({"preempted": True, "signal": "SIGUSR2"})
    assert slurm.wants_requeue({"preempted": True, "signal": "SIGUSR1"})
    assert not slurm.wants_requeue({"preempted": True, "signal": "SIGTERM"})  # scancel stays a cancel
    assert not slurm.wants_requeue({"preempted": True, "signal": "SIGINT"})  # a Ctrl-C: the user stopped it
    assert not slurm.wants_requeue({"preempted": False})


def test_finished_run_ignores_late_warnings(tmp_path, monkeypatch, job_sandbox):
    delayed, _, calls = run_under_submitit(tmp_path, monkeypatch, fake_trainer(None))
    assert delayed.result()["preempted"] is False
    os.kill(os.getpid(), signal.SIGUSR2)  # would requeue a finished job if submitit still handled it
    assert calls == [] and signal.getsignal(signal.SIGUSR2) == signal.SIG_IGN


def test_local_executor_gets_torchrun_variables_and_requeues(tmp_path, monkeypatch, job_sandbox):
    delayed, _, calls = run_under_submitit(tmp_path, monkeypatch, fake_trainer(None), rank=1, executor="local")
    env = delayed.result()["env"]
    assert (env["RANK"], env["WORLD_SIZE"], env["LOCAL_RANK"]) == ("1", "2", "1")
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("127.0.0.1", "29999")
    delayed, paths, _ = run_under_submitit(tmp_path, monkeypatch, fake_trainer(signal.SIGUSR2), executor="local")
    with pytest.raises(SystemExit) as exit_info:  # the local controller restarts the tasks on this code
        delayed.result()
    assert exit_info.value.code == submitit.local.local.LOCAL_REQUEUE_RETURN_CODE
    assert DelayedSubmission.load(paths.submitted_pickle).function.starts == 1


# ----------------------------------------------------------------------------- real local launches


def test_local_launch_with_two_processes_trains_and_exits_0(tmp_path):
    """docs/launch.md's example, shortened: two local tasks (gloo) train one tick and launch.py reports
    rank 0's result (a job with several tasks has no single ``result()``)."""
    from helpers import QUICK_TINY

    run_dir = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_"))}
    proc = subprocess.run(
        [
            sys.executable,
            "launch.py",
            "--local",
            "--ngpus=2",
            "--config-name=tiny",
            *QUICK_TINY,
            "training.total_ticks=1",
            f"run_dir={run_dir}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=env | {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == f"finished: step 2, run dir {run_dir}"
    assert (run_dir / "checkpoint-00000002.pt").exists()
    assert "world 2 × batch_gpu 8" in (run_dir / "log.txt").read_text()


def test_launch_without_submitit_names_the_extra_to_install(tmp_path):
    """After the README's plain install (no extras) launch.py says which extra it needs, in one line."""
    code = (
        "import runpy, sys; sys.modules['submitit'] = None; "  # as if submitit were not installed
        "sys.argv = ['launch.py', '--local', '--config-name=tiny']; "
        "runpy.run_path('launch.py', run_name='__main__')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("launch.py: error: Slurm and local launches need submitit")
    assert 'pip install -e ".[slurm]"' in last
