"""Multi-node training on Slurm through submitit, safe under preemption and time limits.

Topology (docs/method.md §8.2 lists the authors' choice; this module makes a different one on purpose):
**one Slurm task per GPU**. ``sbatch`` asks for ``--nodes=N --ntasks-per-node=G --gres=gpu:G``;
``srun`` starts ``N·G`` copies of submitit's runner, each of which unpickles a :class:`TrainJob`
and runs the trainer *in-process* (``tvm.train.loop.run``). The trainer reads its place in the
job from Slurm's variables (``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, master = first
host of ``SLURM_JOB_NODELIST``, port from the job id; ``tvm/runtime/distributed.py``), so no
rendezvous service is involved. Why not the authors' "one task per node running torchrun":

* Slurm delivers ``--signal`` (and preemption's SIGTERM) to *every process of the job step*.
  With a torchrun agent in the middle, the agent itself gets SIGUSR2, whose default action kills
  it (and orphans or kills the workers), and on SIGTERM it tears its workers down after a fixed
  grace period; with one task per GPU every training rank gets the signal directly and no
  process sits between Slurm and the ranks.
* submitit's requeue logic runs on global rank 0 (``SLURM_PROCID == 0``): with one task per GPU
  that is training rank 0, in the same process, after it has written the checkpoint.
* The job callable knows the trainer's outcome (preempted or finished) from its return value;
  no exit-code convention between processes is needed.

The trainer still accepts torchrun's variables (``train.sh``; a ``torchrun --nnodes`` launch
inside an allocation works too), which the multi-node test exercises.

Signal flow (``launch.py`` submits with ``--signal=USR2@<delay>`` and ``--requeue``):

1. submitit's runner installs its handlers (SIGUSR2: checkpoint and requeue; SIGTERM: log only)
   and calls :meth:`TrainJob.__call__`.
2. The training loop replaces the handlers of SIGUSR2/SIGUSR1/SIGTERM with its own, which only
   set a flag; every ``training.preempt_check_steps`` steps the ranks agree (all-reduce MAX),
   rank 0 writes a checkpoint, all ranks pass a barrier and ``run`` returns ``preempted=True``.
   The loop restores submitit's handlers on the way out.
3. :meth:`TrainJob.__call__` then hands the stop over to submitit by calling submitit's handler
   for its preemption signal: on rank 0 it calls :meth:`TrainJob.checkpoint` (which returns a
   ``DelayedSubmission`` of the same job, dumped as the new submitted pickle), runs
   ``scontrol requeue <job id>`` and exits; the other ranks return. Slurm kills what is left of
   the job and starts it again later with the same job id, the same pickle and therefore the same
   run directory, where the loop resumes from the latest checkpoint.
4. SIGTERM (``scancel``, or preemption with Slurm's own ``PreemptMode=REQUEUE``) also writes the
   checkpoint, but the job is *not* requeued by us: a cancelled job stays cancelled, and a job
   preempted in REQUEUE mode is requeued by Slurm itself.

A signal that arrives before the loop has installed its handlers (start-up, resume) goes to
submitit directly: the job is requeued at once, and nothing is lost because no step was taken
since the checkpoint the run resumed from. After a run has finished, later warnings are ignored.

Local mode (``launch.py --local``) submits the same :class:`TrainJob` through submitit's
``LocalExecutor``: ``G`` processes on this machine, each given torchrun-style variables
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR=127.0.0.1``, a free ``MASTER_PORT``);
the local executor sends the same SIGUSR2 before its time limit and restarts the tasks when rank
0 asks for a requeue, so the whole flow above runs without Slurm.
"""

from __future__ import annotations

import importlib
import os
import shlex
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import submitit
    from submitit.helpers import Checkpointable, DelayedSubmission
except ImportError as exc:
    raise ImportError(
        f'Slurm and local launches need submitit, an optional dependency: pip install -e ".[slurm]" '
        f"in the repository (or pip install submitit) [{exc}]",
        name=exc.name,
    ) from exc

PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's own variable: which SIGUSR* it uses
# Launcher variables that a stale shell environment could carry into the job; inside a Slurm job
# the trainer must read Slurm's own variables instead.
TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)
DEFAULT_MEM_GB_PER_GPU = 32


# ---------------------------------------------------------------------------------------------
# Submission options
# ---------------------------------------------------------------------------------------------


@dataclass
class SlurmOptions:
    """What ``launch.py`` asks Slurm for. ``None`` means "not passed to sbatch" (cluster default).

    Nothing cluster-specific is hard-coded: partition, account, QoS, constraint and GPU type are
    only written when given; network settings (e.g. ``NCCL_SOCKET_IFNAME``) belong in the
    environment or in ``setup`` lines.
    """

    nodes: int = 1
    ngpus: int = 8  # GPUs per node = tasks per node (one task per GPU)
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    timeout_min: int = 24 * 60  # per job run; requeues continue the run
    cpus_per_task: int = 8  # per GPU (one task per GPU)
    mem_gb: int | None = None  # per node; None: 32 GB per GPU; 0: all of the node's memory
    job_name: str = "tvm"
    signal_delay_s: int = 300  # SIGUSR2 this long before the time limit
    max_timeouts: int = 30  # requeues after time limits (preemptions do not count)
    gpu_type: str | None = None  # typed GRES, e.g. "h100" -> --gres=gpu:h100:8
    comment: str | None = None
    exclude: str | None = None
    setup: list[str] = field(default_factory=list)  # shell lines run in the sbatch script first
    srun_args: list[str] = field(default_factory=list)

    def validate(self) -> None:
        for name in ("nodes", "ngpus", "cpus_per_task", "timeout_min"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.mem_gb is not None and self.mem_gb < 0:
            raise ValueError(f"mem_gb must be >= 0, got {self.mem_gb}")
        if self.signal_delay_s < 0 or self.max_timeouts < 0:
            raise ValueError("signal_delay_s and max_timeouts must be >= 0")
        if self.signal_delay_s >= self.timeout_min * 60:
            raise ValueError(
                f"signal_delay_s={self.signal_delay_s} is not shorter than the time limit "
                f"({self.timeout_min} min): the job would be told to stop as it starts"
            )

    @property
    def world_size(self) -> int:
        return self.nodes * self.ngpus


def slurm_parameters(opts: SlurmOptions) -> dict[str, Any]:
    """Parameters for ``submitit.SlurmExecutor.update_parameters`` (Slurm's own names).

    One task per GPU: ``ntasks_per_node = gpus``; ``--gres=gpu[:type]:G``; ``--signal=USR2@delay``
    (submitit derives it from ``signal_delay_s``); ``--requeue`` so that the job may be requeued
    (by submitit after the checkpoint, or by Slurm's preemption) even where the site default is
    ``JobRequeue=0``.
    """
    opts.validate()
    mem_gb = DEFAULT_MEM_GB_PER_GPU * opts.ngpus if opts.mem_gb is None else opts.mem_gb
    params: dict[str, Any] = {
        "job_name": opts.job_name,
        "nodes": opts.nodes,
        "ntasks_per_node": opts.ngpus,
        "gres": f"gpu:{opts.gpu_type}:{opts.ngpus}" if opts.gpu_type else f"gpu:{opts.ngpus}",
        "cpus_per_task": opts.cpus_per_task,
        "mem": f"{mem_gb}GB" if mem_gb else "0",
        "time": opts.timeout_min,
        "signal_delay_s": opts.signal_delay_s,
        "additional_parameters": {"requeue": True},
    }
    optional = {
        "partition": opts.partition,
        "account": opts.account,
        "qos": opts.qos,
        "constraint": opts.constraint,
        "comment": opts.comment,
        "exclude": opts.exclude,
    }
    params.update({key: value for key, value in optional.items() if value})
    if opts.setup:
        params["setup"] = list(opts.setup)
    if opts.srun_args:
        params["srun_args"] = list(opts.srun_args)
    return params


def make_slurm_executor(opts: SlurmOptions, folder: str | Path) -> submitit.SlurmExecutor:
    """A submitit Slurm executor with ``slurm_parameters(opts)``; needs ``srun`` on the PATH."""
    executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
    executor.update_parameters(**slurm_parameters(opts))
    return executor


def make_local_executor(opts: SlurmOptions, folder: str | Path) -> submitit.LocalExecutor:
    """submitit's local executor running ``opts.ngpus`` tasks on this machine (one node).

    On a CUDA machine each task may use ``cuda:LOCAL_RANK`` among the visible GPUs (an existing
    ``CUDA_VISIBLE_DEVICES`` is respected); without CUDA the tasks run on the CPU with gloo.
    """
    opts.validate()
    if opts.nodes != 1:
        raise ValueError(f"local mode runs on one machine: nodes must be 1, got {opts.nodes}")
    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=opts.max_timeouts)
    params: dict[str, Any] = {
        "tasks_per_node": opts.ngpus,
        "timeout_min": opts.timeout_min,
        "signal_delay_s": opts.signal_delay_s,
    }
    if _cuda_device_count() > 0:
        params["gpus_per_node"] = opts.ngpus
        visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
        if visible and all(part.strip().isdigit() for part in visible.split(",")):
            params["visible_gpus"] = [int(part) for part in visible.split(",")]
    executor.update_parameters(**params)
    return executor


def _cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def free_port() -> int:
    """A TCP port that is free on this machine right now (local mode's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# Training arguments (what ``train.py`` would receive)
# ---------------------------------------------------------------------------------------------


def split_train_args(args: Sequence[str]) -> tuple[str, list[str]]:
    """``["--config-name=im256_w2", "a=1"]`` -> ``("im256_w2", ["a=1"])``.

    Accepts ``--config-name=X``, ``--config-name X``, ``-cn X``; everything else must be a Hydra
    override (``key=value``, ``+key=value``, ``~key``). Other Hydra flags (``--multirun``,
    ``--config-path``, ...) are refused: a job runs exactly one configuration.
    """
    name: str | None = None
    overrides: list[str] = []
    items = list(args)
    index = 0
    while index < len(items):
        item = items[index]
        if item.startswith("--config-name="):
            name = item.split("=", 1)[1]
        elif item in ("--config-name", "-cn"):
            if index + 1 >= len(items):
                raise ValueError(f"{item} needs a value")
            name = items[index + 1]
            index += 1
        elif item.startswith("-"):
            raise ValueError(
                f"unsupported training argument {item!r}: pass --config-name=NAME and key=value overrides only"
            )
        elif "=" in item or item.startswith("~"):
            overrides.append(item)
        else:
            raise ValueError(f"training argument {item!r} is not a Hydra override (key=value)")
        index += 1
    if not name:
        raise ValueError("no --config-name given (e.g. --config-name=im256_w2)")
    return name.removesuffix(".yaml"), overrides


def compose_train_config(args: Sequence[str]):
    """The config ``train.py`` would build from ``args`` (validated against the schema)."""
    from tvm.config import compose_config, validate_config

    name, overrides = split_train_args(args)
    cfg = compose_config(name, overrides)
    validate_config(cfg)
    return cfg


def check_config_for_world(cfg, world_size: int) -> None:
    """Fail at submission, not hours later in the queue, when the batch does not split."""
    from tvm.train.update import Batching

    Batching.from_config(cfg.training.batch_size, cfg.training.batch_gpu, world_size)


def run_directory(cfg, workdir: str | Path) -> Path:
    """The run directory the job will use, as an absolute path (relative to ``workdir``)."""
    from tvm.train.loop import resolve_run_dir

    path = resolve_run_dir(cfg)
    return path if path.is_absolute() else Path(workdir) / path


# ---------------------------------------------------------------------------------------------
# The job
# ---------------------------------------------------------------------------------------------


def _resolve(target: str) -> Callable[..., Any]:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def preemption_signal() -> signal.Signals:
    """The signal submitit requeues on (``SUBMITIT_PREEMPT_SIGNAL``, default USR2)."""
    name = "SIG" + os.environ.get(PREEMPT_SIGNAL_ENV, "USR2").upper().removeprefix("SIG")
    sig = getattr(signal, name, None)
    if not isinstance(sig, signal.Signals):
        raise ValueError(f"{PREEMPT_SIGNAL_ENV} names no signal: {name}")
    return sig


def wants_requeue(result: dict[str, Any]) -> bool:
    """Whether a run that returned ``result`` should be requeued.

    Preempted by SIGUSR1/SIGUSR2 (Slurm's warning before the time limit or, with
    ``PreemptParameters=send_user_signal``, before preemption): yes. SIGTERM: no (``scancel``
    must stay a cancel; Slurm requeues REQUEUE-mode preemptions itself). SIGINT (a Ctrl-C): no,
    the user stopped the run. Unknown signal (a loop that does not report it): yes, the warning
    signal is by far the common case.
    """
    if not result.get("preempted"):
        return False
    return result.get("signal") not in ("SIGTERM", "SIGINT")


class TrainJob(Checkpointable):
    """The submitit job: train with ``train.py``'s arguments in the same run directory each time.

    ``__call__`` runs on every task. ``checkpoint`` is called by submitit on rank 0 when the job
    is to be requeued; it returns the same job, so a requeued job resumes the same run (the
    training state lives in the run directory, not in the pickle).
    """

    trainer = "tvm.train.loop:run"  # "module:function" taking the config, returning the result dict

    def __init__(self, train_args: Sequence[str], workdir: str | Path, master_port: int | None = None) -> None:
        self.train_args = list(train_args)
        self.workdir = str(workdir)
        self.master_port = master_port  # local mode only; Slurm derives it from the job id
        self.starts = 0  # how many times this job was requeued (for the log)

    def __call__(self) -> dict[str, Any]:
        os.chdir(self.workdir)
        self._set_launch_env()
        cfg = compose_train_config(self.train_args)
        print(f"[tvm.launch] start {self.starts + 1} of this job; train.py {shlex.join(self.train_args)}", flush=True)
        result = _resolve(self.trainer)(cfg)
        self._cleanup_process_group()
        if not result.get("preempted"):
            self._ignore_late_warnings()
            return result
        if wants_requeue(result):
            self._hand_over_to_submitit()
        else:
            print(
                f"[tvm.launch] stopped on {result.get('signal')} with a checkpoint; not requeueing "
                "(resubmit the same command to continue)",
                flush=True,
            )
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> DelayedSubmission:
        """Called by submitit (rank 0) before it requeues: the same job again."""
        self.starts += 1
        return DelayedSubmission(self, *args, **kwargs)

    # ------------------------------------------------------------------ helpers

    def _set_launch_env(self) -> None:
        """Make the trainer read the right launcher variables (see the module docstring)."""
        executor = os.environ.get("SUBMITIT_EXECUTOR")
        if executor == "slurm":
            for name in TORCHRUN_VARS:
                os.environ.pop(name, None)
        elif executor == "local":
            from tvm.runtime.distributed import slurm_master_port

            env = submitit.JobEnvironment()
            port = self.master_port or slurm_master_port(env.job_id)  # same on every task
            os.environ.update(
                RANK=str(env.global_rank),
                WORLD_SIZE=str(env.num_tasks),
                LOCAL_RANK=str(env.local_rank),
                LOCAL_WORLD_SIZE=str(env.num_tasks),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port),
            )

    @staticmethod
    def _cleanup_process_group() -> None:
        from tvm.runtime import distributed

        distributed.cleanup()

    @staticmethod
    def _ignore_late_warnings() -> None:
        """A warning signal after the run finished must not requeue a finished job."""
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            signal.signal(sig, signal.SIG_IGN)

    @staticmethod
    def _hand_over_to_submitit() -> None:
        """Let submitit's handler for its preemption signal checkpoint this job and requeue it.

        The loop has already saved the training state. On global rank 0 submitit calls
        ``checkpoint``, dumps the new pickle, requeues (Slurm: ``scontrol requeue``; local:
        exit code 144, which makes the local controller restart the tasks) and exits; on the
        other ranks it returns. Outside submitit there is nothing to requeue.
        """
        if "SUBMITIT_EXECUTOR" not in os.environ:
            print("[tvm.launch] preempted outside submitit: run the same command again to resume", flush=True)
            return
        sig = preemption_signal()
        handler = signal.getsignal(sig)
        if not callable(handler):
            print(
                f"[tvm.launch] no submitit handler for {sig.name} (found {handler!r}); not requeueing",
                file=sys.stderr,
                flush=True,
            )
            return
        print(f"[tvm.launch] checkpoint written; handing over to submitit ({sig.name}) to requeue", flush=True)
        handler(sig, None)


# ---------------------------------------------------------------------------------------------
# Submission
# ---------------------------------------------------------------------------------------------


@dataclass
class Submission:
    job: Any  # submitit Job
    run_dir: Path
    folder: Path


def submit(
    opts: SlurmOptions,
    train_args: Sequence[str],
    *,
    local: bool = False,
    folder: str | Path | None = None,
    workdir: str | Path | None = None,
) -> Submission:
    """Validate the training config, then submit one :class:`TrainJob` (Slurm, or local).

    ``folder`` holds submitit's scripts, pickles and per-task logs; default ``<run dir>/submitit``
    (on the shared file system, next to the checkpoints).
    """
    workdir = Path(workdir or os.getcwd()).resolve()
    cfg = compose_train_config(train_args)
    check_config_for_world(cfg, opts.world_size)
    run_dir = run_directory(cfg, workdir)
    folder = Path(folder) if folder else run_dir / "submitit"
    folder = folder if folder.is_absolute() else workdir / folder
    executor: submitit.Executor
    if local:
        executor = make_local_executor(opts, folder)
        job_fn = TrainJob(train_args, workdir, master_port=free_port())
    else:
        executor = make_slurm_executor(opts, folder)
        job_fn = TrainJob(train_args, workdir)
    job = executor.submit(job_fn)
    return Submission(job=job, run_dir=run_dir, folder=folder)
