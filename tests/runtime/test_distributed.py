"""Launcher environment resolution, hostlists, rank helpers and seeding (tvm/runtime/distributed.py)."""

from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from tvm.runtime import distributed as D

_LAUNCH_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "SLURM_PROCID",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_LOCALID",
    "SLURM_JOB_NODELIST",
    "SLURM_STEP_NODELIST",
    "SLURM_NODELIST",
    "SLURM_JOB_ID",
)


@pytest.mark.parametrize(
    ("hostlist", "expected"),
    [
        ("gpu5", ["gpu5"]),
        ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
        ("a,b", ["a", "b"]),
        ("n[8-11]", ["n8", "n9", "n10", "n11"]),
        ("n[098-101]", ["n098", "n099", "n100", "n101"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("x[3],y-[5-6].ib", ["x3", "y-5.ib", "y-6.ib"]),
    ],
)
def test_parse_hostlist(hostlist: str, expected: list[str]) -> None:
    assert D.parse_hostlist(hostlist) == expected


@pytest.mark.parametrize("hostlist", ["n[1-", "n1-2]", "n[3-1]", "n[a]", "", "n[1-2"])
def test_parse_hostlist_rejects_malformed(hostlist: str) -> None:
    with pytest.raises(ValueError, match="hostlist"):
        D.parse_hostlist(hostlist)


def test_resolve_torchrun_env() -> None:
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "h0", "MASTER_PORT": "29400"}
    assert D.resolve_launch_env(env) == D.LaunchEnv(3, 8, 1, "h0", 29400, "torchrun")


def test_resolve_slurm_env() -> None:
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "5",
        "SLURM_JOB_NODELIST": "node[07-08]",
        "SLURM_JOB_ID": "4123456",
    }
    assert D.resolve_launch_env(env) == D.LaunchEnv(5, 16, 5, "node07", 13456, "slurm")
    step_env = {**env, "SLURM_STEP_NUM_TASKS": "8", "MASTER_ADDR": "override", "MASTER_PORT": "1234"}
    assert D.resolve_launch_env(step_env) == D.LaunchEnv(5, 8, 5, "override", 1234, "slurm")


def test_torchrun_wins_over_slurm_and_none_without_either() -> None:
    both = {"RANK": "1", "WORLD_SIZE": "2", "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_ID": "7"}
    assert D.resolve_launch_env(both).source == "torchrun"
    assert D.resolve_launch_env({"PATH": "/bin"}) is None
    with pytest.raises(ValueError, match="SLURM_PROCID='x'"):
        D.resolve_launch_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "a", "SLURM_JOB_ID": "1"})


def test_single_process_without_launcher(monkeypatch) -> None:
    for name in _LAUNCH_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx = D.init_distributed(device="cpu")
    assert ctx == D.DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None)
    assert ctx.is_main and not ctx.distributed and not D.is_distributed()
    tensor = torch.tensor([2.0])
    assert D.all_reduce_sum_(tensor) is tensor and tensor.item() == 2.0
    assert D.broadcast_object({"a": 1}) == {"a": 1} and D.all_gather_object(3) == [3]
    assert D.is_main() and D.get_world_size() == 1 and D.shared_seed(7) == 7
    D.barrier()
    D.cleanup()


def test_step_generator_is_deterministic_and_step_dependent() -> None:
    def draw(seed: int, step: int) -> torch.Tensor:
        return torch.rand(4, generator=D.step_generator(seed, step, "cpu"))

    assert torch.equal(draw(0, 5), draw(0, 5))
    assert not torch.equal(draw(0, 5), draw(0, 6))
    assert not torch.equal(draw(0, 5), draw(1, 5))
    with pytest.raises(ValueError, match="non-negative"):
        D.step_generator(-1, 0)


def test_batch_positions_tile_the_global_batch_as_the_data_sampler_does() -> None:
    """Rank r's round j of a step takes the rows r + W·(j·b + m) of the step's global draws: the
    stream positions the data sampler gives that rank and round."""
    from tvm.data.datasets import InfiniteSampler
    from tvm.method.times import Guidance, TimeSampling, draw_step
    from tvm.train.update import Batching, take

    batching = Batching.from_config(16, 2, 4)  # W = 4 ranks, b = 2 per round, 2 rounds
    assert batching.rounds == 2
    rows = torch.cat([batching.positions(r, j) for r in range(4) for j in range(2)])
    assert sorted(rows.tolist()) == list(range(16))
    assert batching.positions(1, 1).tolist() == [9, 13]
    stream = iter(InfiniteSampler(100, rank=1, world_size=4, seed=0))
    rank_1 = [next(stream) for _ in range(4)]  # rounds 0 and 1 of step 0
    one_process = iter(InfiniteSampler(100, seed=0))
    stream_positions = [next(one_process) for _ in range(16)]  # the whole step in one process
    assert rank_1[2:] == [stream_positions[p] for p in batching.positions(1, 1).tolist()]
    draws = draw_step(D.step_generator(0, 3), 16, (2, 2, 2), TimeSampling(), Guidance(cfg=2.0))
    mine = take(draws, batching.positions(1, 1))
    assert torch.equal(mine.noise, draws.noise[[9, 13]]) and torch.equal(mine.drop, draws.drop[[9, 13]])
    with pytest.raises(ValueError, match="not divisible"):
        Batching.from_config(10, None, 4)


_WORKER = textwrap.dedent(
    """
    import json, torch
    from tvm.runtime import distributed as D
    ctx = D.init_distributed(device="cpu")
    total = D.all_reduce_sum_(torch.tensor([ctx.rank + 1.0, 10.0]))
    obj = D.broadcast_object({"seed": 1234, "path": "/run"} if ctx.rank == 0 else None)
    D.barrier()
    mine = torch.tensor([[p, 10 * p] for p in range(ctx.rank, 5, ctx.world_size)])  # positions r, r + W, ...
    lone = torch.tensor([[7]]) if ctx.rank == 0 else torch.empty(0)  # a sequence of one: rank 1 holds nothing
    to_root = D.gather_interleaved(mine, 5, dst=0)
    print("RESULT " + json.dumps({"rank": ctx.rank, "world": ctx.world_size, "backend": ctx.backend,
                                  "sum": total.tolist(), "obj": obj, "gathered": D.all_gather_object(ctx.rank),
                                  "is_main": D.is_main(), "interleaved": D.gather_interleaved(mine, 5).tolist(),
                                  "to_root": None if to_root is None else to_root.tolist(),
                                  "lone": D.gather_interleaved(lone, 1).tolist()}), flush=True)
    D.cleanup()
    """
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch_env(mode: str, rank: int, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _LAUNCH_VARS}
    if mode == "torchrun":
        env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    else:  # Slurm: master host from the node list, port from the job id (10000 + last 4 digits)
        env.update(
            SLURM_PROCID=str(rank),
            SLURM_NTASKS="2",
            SLURM_LOCALID=str(rank),
            SLURM_JOB_NODELIST="localhost",
            SLURM_JOB_ID=f"98{port - 10000:04d}",
        )
    return env


def _free_port_for_slurm() -> int:
    """A free port in 10000-19999, the range a Slurm job id maps to."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(10000, 20000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    pytest.skip("no free port in 10000-19999 to emulate a Slurm job id")


def _run_two_workers(script: str, mode: str, port: int, **env: str) -> tuple[list[int], list[tuple[str, str]]]:
    """Run ``python -c script`` as ranks 0 and 1 of a ``mode`` launch; their exit codes and (stdout, stderr)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script],
            env=_launch_env(mode, rank, port) | env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    return [proc.returncode for proc in procs], outputs


@pytest.mark.parametrize("mode", ["torchrun", "slurm"])
def test_two_process_gloo(mode: str) -> None:
    port = _free_port() if mode == "torchrun" else _free_port_for_slurm()
    codes, outputs = _run_two_workers(_WORKER, mode, port)
    assert codes == [0, 0], [err for _, err in outputs]
    lines = [line for out, _ in outputs for line in out.splitlines() if line.startswith("RESULT ")]
    results = sorted((json.loads(line[len("RESULT ") :]) for line in lines), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert r["world"] == 2 and r["backend"] == "gloo"
        assert r["sum"] == [3.0, 20.0]
        assert r["obj"] == {"seed": 1234, "path": "/run"}
        assert r["gathered"] == [0, 1]
        assert r["interleaved"] == [[p, 10 * p] for p in range(5)] and r["lone"] == [[7]]
    assert [r["is_main"] for r in results] == [True, False]
    assert results[0]["to_root"] == [[p, 10 * p] for p in range(5)] and results[1]["to_root"] is None


_EXITING_WORKER = textwrap.dedent(
    """
    import atexit, sys, threading, time
    import torch
    from tvm.runtime import distributed as D

    D.init_distributed(device="cpu")
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 2))  # keeps the group referenced
    model(torch.ones(4, 3)).sum().backward()
    D.all_gather_object(D.get_rank())
    rank = D.get_rank()
    D.cleanup()
    atexit.register(lambda: print(f"atexit ran on rank {rank}"))
    threading.Thread(target=lambda: (time.sleep(0.3), print(f"thread finished on rank {rank}"))).start()
    sys.stdout.write(f"buffered line from rank {rank}\\n")  # a pipe: block-buffered until exit_process flushes
    D.exit_process(3 + rank if rank else "rank 0 says why")
    """
)


def test_exit_process_after_a_process_group_finishes_shutdown_work_and_keeps_the_code() -> None:
    codes, outputs = _run_two_workers(_EXITING_WORKER, "torchrun", _free_port(), PYTHONUNBUFFERED="")
    assert codes == [1, 4], [err for _, err in outputs]
    assert outputs[0][1].strip().endswith("rank 0 says why")
    for rank, (out, _) in enumerate(outputs):
        assert f"thread finished on rank {rank}" in out and f"atexit ran on rank {rank}" in out
        assert f"buffered line from rank {rank}" in out
        assert out.index("thread finished") < out.index("atexit ran")  # threads joined first, as Python does


def test_exit_process_without_a_process_group_is_sys_exit(monkeypatch) -> None:
    monkeypatch.setattr(D, "_group_created", False)
    with pytest.raises(SystemExit) as stop:
        D.exit_process(5)
    assert stop.value.code == 5


def test_gather_interleaved_without_a_process_group_is_the_identity() -> None:
    local = torch.arange(6).reshape(3, 2)
    assert D.gather_interleaved(local, 3) is local and D.gather_interleaved(local, 3, dst=0) is local
