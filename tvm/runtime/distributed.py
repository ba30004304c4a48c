"""Process-group set-up, rank helpers and per-step seeding.

One trainer, three launch modes (docs/method.md §8.1-8.4):

* **torchrun** (``train.sh``, or ``launch.py`` running torchrun on each node): ``RANK``,
  ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` are set;
* **Slurm, one task per GPU** (``srun``/submitit with ``tasks_per_node = GPUs``): rank and size
  come from ``SLURM_PROCID``/``SLURM_NTASKS``/``SLURM_LOCALID``, the master is the first host of
  the node list and the port is derived from the job id (as upstream's launcher does, §8.2);
* **neither**: a single process without a process group.

Backend: NCCL when the device is CUDA, gloo otherwise (CPU; docs/method.md §11 item 16). No NCCL
tuning variables are set here: upstream forced ``NCCL_SOCKET_IFNAME=enp`` (§8.4), which breaks on
hosts without ``enp*`` interfaces; cluster-specific settings belong in the user's environment.

Every helper is a no-op (or the identity) when no process group is initialised, so the same
code runs single-process on a laptop.
"""

from __future__ import annotations

import atexit
import os
import re
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, NoReturn, overload

import numpy as np
import torch
import torch.distributed as dist

DEFAULT_MASTER_PORT_BASE = 10000
_group_created = False  # True once this process created a process group (exit_process reads it)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun" or "slurm"


@dataclass(frozen=True)
class DistContext:
    """Result of ``init_distributed``: this process's rank, the job size and its device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the only rank that writes files)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """True when a process group is active (world size > 1)."""
        return self.backend is not None


# ---------------------------------------------------------------------------------------------
# Environment resolution (pure functions of a mapping, so tests need no real launcher)
# ---------------------------------------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets: ``a[1,2],b`` -> ``["a[1,2]", "b"]``."""
    parts, depth, start = [], 0, 0
    for index, char in enumerate(text):
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in Slurm hostlist {text!r}")
        elif char == "," and depth == 0:
            parts.append(text[start:index])
            start = index + 1
    if depth != 0:
        raise ValueError(f"unbalanced '[' in Slurm hostlist {text!r}")
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _expand_range_set(body: str, hostlist: str) -> list[str]:
    """``01-03,07`` -> ``["01", "02", "03", "07"]``; zero padding follows the lower bound's width."""
    values: list[str] = []
    for item in body.split(","):
        item = item.strip()
        if re.fullmatch(r"\d+", item):
            values.append(item)
            continue
        match = re.fullmatch(r"(\d+)-(\d+)", item)
        if not match:
            raise ValueError(f"bad range {item!r} in Slurm hostlist {hostlist!r}")
        low, high = match.groups()
        if int(high) < int(low):
            raise ValueError(f"descending range {item!r} in Slurm hostlist {hostlist!r}")
        width = len(low)
        values.extend(str(n).zfill(width) for n in range(int(low), int(high) + 1))
    return values


def _expand_host_pattern(pattern: str, hostlist: str) -> list[str]:
    """Expand one host pattern with any number of bracket groups (cartesian product, in order)."""
    match = re.search(r"\[([^\[\]]*)\]", pattern)
    if match is None:
        if "[" in pattern or "]" in pattern:
            raise ValueError(f"unbalanced brackets in Slurm hostlist {hostlist!r}")
        return [pattern]
    head, tail = pattern[: match.start()], pattern[match.end() :]
    expanded_tail = _expand_host_pattern(tail, hostlist)
    return [head + value + rest for value in _expand_range_set(match.group(1), hostlist) for rest in expanded_tail]


def parse_hostlist(hostlist: str) -> list[str]:
    """Expand Slurm's compressed host list syntax, preserving order.

    ``"node[01-03,07],gpu5"`` -> ``["node01", "node02", "node03", "node07", "gpu5"]``;
    ``"r[1-2]-n[1-2]"`` -> ``["r1-n1", "r1-n2", "r2-n1", "r2-n2"]``. Raises ``ValueError`` on
    malformed input.
    """
    hosts = [host for pattern in _split_top_level(hostlist) for host in _expand_host_pattern(pattern, hostlist)]
    if not hosts:
        raise ValueError(f"empty Slurm hostlist {hostlist!r}")
    return hosts


def _int_env(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def slurm_master_port(job_id: str) -> int:
    """``10000 + last four digits of SLURM_JOB_ID`` (docs/method.md §8.2): same on every task of a job."""
    digits = re.sub(r"\D", "", job_id)
    if not digits:
        raise ValueError(f"SLURM_JOB_ID={job_id!r} contains no digits")
    return DEFAULT_MASTER_PORT_BASE + int(digits[-4:])


def resolve_launch_env(env: Mapping[str, str] | None = None) -> LaunchEnv | None:
    """Read rank/size/master from torchrun's variables, else Slurm's, else return None.

    torchrun wins when both are present (torchrun inside a Slurm allocation). For Slurm the step
    values (``SLURM_STEP_NUM_TASKS``, ``SLURM_STEP_NODELIST``) are preferred over the job values
    so that a step using part of the allocation works; ``MASTER_ADDR``/``MASTER_PORT`` already in
    the environment override the derived ones.
    """
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int_env(env, "RANK"),
            world_size=_int_env(env, "WORLD_SIZE"),
            local_rank=_int_env(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "localhost"),
            master_port=_int_env(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="torchrun",
        )
    tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
    if "SLURM_PROCID" in env and tasks_var in env:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        if "MASTER_ADDR" in env:
            master_addr = env["MASTER_ADDR"]
        elif nodelist:
            master_addr = parse_hostlist(nodelist)[0]
        else:
            raise ValueError("Slurm environment without SLURM_JOB_NODELIST or MASTER_ADDR: cannot find the master host")
        if "MASTER_PORT" in env:
            master_port = _int_env(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            master_port = slurm_master_port(env["SLURM_JOB_ID"])
        else:
            raise ValueError("Slurm environment without SLURM_JOB_ID or MASTER_PORT: cannot choose the master port")
        return LaunchEnv(
            rank=_int_env(env, "SLURM_PROCID"),
            world_size=_int_env(env, tasks_var),
            local_rank=_int_env(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=master_addr,
            master_port=master_port,
            source="slurm",
        )
    return None


# ---------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------


def _select_device(local_rank: int, device: str | torch.device | None) -> torch.device:
    """CUDA device ``local_rank`` when CUDA is available (or requested), else the CPU."""
    if device is not None:
        chosen = torch.device(device)
        if chosen.type == "cuda" and chosen.index is None:
            chosen = torch.device("cuda", local_rank)
    elif torch.cuda.is_available():
        chosen = torch.device("cuda", local_rank)
    else:
        chosen = torch.device("cpu")
    if chosen.type == "cuda":
        count = torch.cuda.device_count()
        if chosen.index >= count:
            raise RuntimeError(
                f"local rank {local_rank} needs CUDA device {chosen.index} but only {count} are visible; "
                "launch one process per GPU"
            )
        torch.cuda.set_device(chosen)
    return chosen


def init_distributed(
    backend: str | None = None, timeout_minutes: float = 120, device: str | torch.device | None = None
) -> DistContext:
    """Initialise the default process group from the launcher's environment (module docstring).

    ``backend`` None chooses NCCL for CUDA devices and gloo otherwise; ``device`` None chooses
    ``cuda:LOCAL_RANK`` when CUDA is available, else the CPU (pass ``"cpu"`` to force it). The
    timeout (120 min as upstream, docs/method.md §5.1 item 2) bounds every collective. With no launcher
    variables, or a world size of 1, no process group is created. Calling it again after a group
    exists returns the context of that group.
    """
    global _group_created
    launch = resolve_launch_env()
    rank, world_size, local_rank = (launch.rank, launch.world_size, launch.local_rank) if launch else (0, 1, 0)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    chosen = _select_device(local_rank, device)
    if world_size == 1:
        return DistContext(rank=0, world_size=1, local_rank=local_rank, device=chosen, backend=None)
    if not dist.is_available():
        raise RuntimeError("torch.distributed is not available in this PyTorch build but WORLD_SIZE > 1")
    if dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), local_rank, chosen, dist.get_backend())
    assert launch is not None  # world_size > 1 comes from the launch environment
    backend = backend or ("nccl" if chosen.type == "cuda" else "gloo")
    os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    os.environ.setdefault("MASTER_PORT", str(launch.master_port))
    dist.init_process_group(
        backend=backend,
        init_method="env://",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(minutes=timeout_minutes),
        device_id=chosen if backend == "nccl" else None,  # binds the rank's GPU (barrier needs it)
    )
    _group_created = True
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=chosen, backend=backend)


def is_distributed() -> bool:
    """True when a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    """Global rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on global rank 0; gate every file write (checkpoints, logs) with it."""
    return get_rank() == 0


def barrier() -> None:
    """Wait for all ranks (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks; returns the tensor. With NCCL the tensor must be on the GPU."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max_(tensor: torch.Tensor) -> torch.Tensor:
    """In-place element-wise maximum over ranks; returns the tensor."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Return ``src``'s ``obj`` on every rank (pickled; for small objects such as seeds, paths)."""
    if not is_distributed():
        return obj
    holder = [obj if get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


def raise_on_every_rank(error: Exception | None, remote_error: Callable[[str, int | None], Exception]) -> None:
    """Share rank 0's error (or its absence) with every rank, so that a failure there never leaves
    the other ranks waiting at the next collective: rank 0 re-raises its own exception, the others
    raise ``remote_error(message, errno)`` built from rank 0's ``"Type: message"`` and OS errno."""
    shared = broadcast_object(
        None if error is None else (f"{type(error).__name__}: {error}", getattr(error, "errno", None))
    )
    if error is not None:
        raise error
    if shared is not None:
        raise remote_error(*shared)


def all_gather_object(obj: Any) -> list[Any]:
    """List of every rank's ``obj`` in rank order (``[obj]`` without a process group)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@overload
def gather_interleaved(local: torch.Tensor, count: int, dst: None = None) -> torch.Tensor: ...
@overload
def gather_interleaved(local: torch.Tensor, count: int, dst: int) -> torch.Tensor | None: ...
def gather_interleaved(local: torch.Tensor, count: int, dst: int | None = None) -> torch.Tensor | None:
    """The ``count`` rows of a sequence sharded round-robin over ranks, in sequence order, on the CPU.

    Rank ``r`` of ``W`` holds positions ``r, r + W, r + 2W, …`` (``len(range(r, count, W))`` rows;
    a rank without positions may pass any empty tensor). The result is ``[count, *row_shape]`` on
    every rank (``dst=None``) or on rank ``dst`` only (the others get None). Every rank must call
    it; without a process group it returns ``local`` itself (on its device). This is the one index-ordered
    gather of the project: image indices (:mod:`tvm.eval.generate`, :mod:`tvm.eval.metrics`) and
    detector features (:mod:`tvm.eval.fid`) use it, so results do not depend on ``W``.
    """
    world = get_world_size()
    if world == 1:
        return local
    local = local.detach().cpu()
    parts: list[Any] | None
    if dst is None:
        parts = all_gather_object(local)
    else:
        parts = [None] * world if get_rank() == dst else None
        dist.gather_object(local, parts, dst=dst)
        if parts is None:
            return None
    filled = [part for part in parts if part.numel()]
    if not filled:
        return parts[0]
    out = torch.empty((count, *filled[0].shape[1:]), dtype=filled[0].dtype)
    for rank, part in enumerate(parts):
        expected = len(range(rank, count, world))
        if len(part) != expected and (expected or part.numel()):
            raise ValueError(f"gather_interleaved: rank {rank} holds {len(part)} rows of {count}, expected {expected}")
        if expected:
            out[rank::world] = part
    return out


def cleanup() -> None:
    """Destroy the process group if one exists."""
    if is_distributed():
        dist.destroy_process_group()


def exit_process(code: int | str | None) -> NoReturn:
    """End the process with ``code`` (as ``sys.exit``: None is 0, a string is printed and gives 1).

    Without a process group in this process's past this is ``sys.exit(code)``. After one, the
    interpreter's own shutdown work is done while the interpreter is fully alive — non-daemon
    threads joined (``threading._shutdown``, as finalisation does first), ``atexit`` handlers run,
    stdout/stderr flushed — and the process ends with ``os._exit(code)``, skipping finalisation.
    Why: the backend's worker threads (gloo's) outlive ``destroy_process_group`` (DDP keeps the group
    referenced) and may drop the last reference to a finished collective's tensors a moment after
    it returned; a thread that needs the GIL for that while the interpreter finalises aborts the
    whole process ("terminate called without an active exception", pytorch/pytorch#190489). Seen on
    rank 1 of the two-node CPU test in about 1 of 15–20 runs on a loaded 2-core machine
    (``bench/two_node_exit.sh``); the aborted rank's agent then fails and the other waits out
    torchrun's 300 s exit barrier.
    """
    if not _group_created:
        sys.exit(code)
    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    threading._shutdown()  # type: ignore[attr-defined]  # what Py_FinalizeEx runs first
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


# ---------------------------------------------------------------------------------------------
# Seeds and per-step randomness
# ---------------------------------------------------------------------------------------------


def shared_seed(seed: int | None) -> int:
    """``seed`` if given, else a random seed drawn on rank 0 and broadcast (docs/method.md §5.1 item 4)."""
    if seed is not None:
        return int(seed)
    drawn = int(np.random.SeedSequence().generate_state(1)[0] & 0x7FFFFFFF) if is_main() else None
    return int(broadcast_object(drawn, src=0))


def step_seed(seed: int, step: int) -> int:
    """A 64-bit seed that depends only on (run seed, step), mixed by NumPy's SeedSequence."""
    if seed < 0 or step < 0:
        raise ValueError(f"seed and step must be non-negative, got seed={seed}, step={step}")
    return int(np.random.SeedSequence([seed, step]).generate_state(1, dtype=np.uint64)[0])


def step_generator(seed: int, step: int, device: str | torch.device = "cpu") -> torch.Generator:
    """Generator for all of step ``step``'s random draws, identical on every rank.

    Why: docs/method.md §2 (last paragraph) and §11 item 8 — draw times, noise, CFG and
    label dropout for the *global* batch from this generator and let each rank and accumulation
    round take its rows (``Batching.positions`` in tvm/train/update.py); results then depend neither
    on the GPU count nor on accumulation, and a resumed run draws what an uninterrupted one would. CPU and CUDA
    generators produce different streams: use the same device type on every rank.
    """
    generator = torch.Generator(device=torch.device(device))
    generator.manual_seed(step_seed(seed, step))
    return generator
