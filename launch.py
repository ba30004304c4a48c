"""Submit a training run to Slurm through submitit (or run it locally the same way).

    python launch.py --ngpus=8 --nodes=4 --partition=gpu --config-name=im256_w2 [overrides ...]
    python launch.py --local --ngpus=2 --config-name=tiny training.total_ticks=2

One Slurm task per GPU; the job checkpoints on SIGUSR2 (sent ``--signal-delay-s`` before the time
limit), SIGUSR1 or SIGTERM, is requeued by submitit and resumes in the same run directory.
Arguments this script does not know are forwarded to ``train.py`` (``--config-name`` and Hydra
overrides). See docs/launch.md and ``tvm/train/slurm.py``.
"""

from __future__ import annotations

import argparse
import sys

try:
    from tvm.train.slurm import SlurmOptions, submit
except ImportError as exc:  # submitit is the optional extra [slurm]; the message says how to install it
    sys.exit(f"launch.py: error: {exc}")


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    defaults = SlurmOptions()
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    parser.add_argument("--ngpus", type=int, default=defaults.ngpus, help="GPUs per node = tasks per node")
    parser.add_argument("--nodes", type=int, default=defaults.nodes)
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
    parser.add_argument("--qos", default=None)
    parser.add_argument("--constraint", default=None)
    parser.add_argument(
        "--timeout-min",
        "--time",
        dest="timeout_min",
        type=int,
        default=defaults.timeout_min,
        help="time limit of each job run in minutes (requeues continue the run)",
    )
    parser.add_argument("--cpus-per-task", type=int, default=defaults.cpus_per_task, help="CPUs per GPU task")
    parser.add_argument(
        "--mem-gb",
        type=int,
        default=None,
        help="memory per node in GB (default: 32 per GPU; 0 = all of the node's memory)",
    )
    parser.add_argument("--job-name", default=None, help="default: tvm-<config name>")
    parser.add_argument(
        "--signal-delay-s",
        type=int,
        default=defaults.signal_delay_s,
        help="SIGUSR2 is sent this long before the time limit",
    )
    parser.add_argument(
        "--max-timeouts",
        type=int,
        default=defaults.max_timeouts,
        help="how many time-limit requeues are allowed (preemptions are not counted)",
    )
    parser.add_argument("--gpu-type", default=None, help="typed GRES, e.g. h100 -> --gres=gpu:h100:NGPUS")
    parser.add_argument("--comment", default=None)
    parser.add_argument("--exclude", default=None, help="nodes to avoid")
    parser.add_argument(
        "--setup",
        action="append",
        default=[],
        help="shell line run in the sbatch script before srun (repeatable), e.g. 'export NCCL_SOCKET_IFNAME=ib0'",
    )
    parser.add_argument(
        "--srun-arg", dest="srun_args", action="append", default=[], help="extra srun argument (repeatable)"
    )
    parser.add_argument("--folder", default=None, help="submitit folder (default <run dir>/submitit)")
    parser.add_argument("--local", action="store_true", help="run on this machine with submitit's local executor")
    return parser.parse_known_args(argv)


def options_from_args(args: argparse.Namespace, train_args: list[str]) -> SlurmOptions:
    from tvm.train.slurm import split_train_args

    config_name, _ = split_train_args(train_args)
    return SlurmOptions(
        nodes=args.nodes,
        ngpus=args.ngpus,
        partition=args.partition,
        account=args.account,
        qos=args.qos,
        constraint=args.constraint,
        timeout_min=args.timeout_min,
        cpus_per_task=args.cpus_per_task,
        mem_gb=args.mem_gb,
        job_name=args.job_name or f"tvm-{config_name}",
        signal_delay_s=args.signal_delay_s,
        max_timeouts=args.max_timeouts,
        gpu_type=args.gpu_type,
        comment=args.comment,
        exclude=args.exclude,
        setup=args.setup,
        srun_args=args.srun_args,
    )


def main(argv: list[str] | None = None) -> int:
    args, train_args = parse_args(argv)
    opts = options_from_args(args, train_args)
    submission = submit(opts, train_args, local=args.local, folder=args.folder)
    job = submission.job
    where = "locally" if args.local else "to Slurm"
    print(
        f"submitted job {job.job_id} {where}: {opts.nodes} node(s) x {opts.ngpus} task(s)\n"
        f"  run dir  {submission.run_dir}\n  logs     {submission.folder}",
        flush=True,
    )
    if not args.local:
        return 0
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        result = job.results()[0]  # rank 0's; the local executor restarts the tasks on requeue, like Slurm
    except KeyboardInterrupt:
        job.cancel(check=False)
        print(
            "launch.py: interrupted: the local job was cancelled; running the same command again continues "
            "from the latest checkpoint",
            file=sys.stderr,
        )
        return 130
    except (FailedJobError, UncompletedJobError) as error:
        print(
            f"launch.py: error: the job ended without finishing ({type(error).__name__}); see the logs in "
            f"{submission.folder}. Running the same command again continues from the latest checkpoint.",
            file=sys.stderr,
        )
        return 1
    step = result["progress"]["step"]
    if result.get("preempted"):
        print(
            f"stopped at step {step} on {result.get('signal')} with a checkpoint, run dir {result['run_dir']}; "
            "running the same command again continues the run",
            flush=True,
        )
    else:
        print(f"finished: step {step}, run dir {result['run_dir']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
