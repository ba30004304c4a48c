"""Small shared builders for tests (importable as ``tests.helpers``... via sys.path below)."""

from __future__ import annotations

import torch

from tvm.models.dit import DiT
from tvm.method.times import StepDraws
from tvm.method.wrapper import TVMWrapper


def single_thread():
    """Generator fixture body: torch on one thread for the scope (tiny models run far faster, do not
    stall on a busy machine, and forked trials match in-process runs bit for bit)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_dit(
    num_classes: int = 10,
    input_size: int = 8,
    in_channels: int = 2,
    depth: int = 2,
    hidden: int = 32,
    heads: int = 4,
    **kwargs,
) -> DiT:
    return DiT(
        "DiT-S/2",
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        hidden_size=hidden,
        depth=depth,
        num_heads=heads,
        **kwargs,
    )


@torch.no_grad()
def perturb_(module: torch.nn.Module, scale: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add noise to every trainable parameter so that the zero-initialised layers become live."""
    gen = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        if p.requires_grad:
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return module


def tiny_wrapper(
    do_scale_param: bool = True, perturb: bool = True, dtype: torch.dtype = torch.float64, **kwargs
) -> TVMWrapper:
    torch.manual_seed(0)
    model = tiny_dit(**kwargs)
    if perturb:
        perturb_(model)
    net = TVMWrapper(model, data_type="fp32", do_scale_param=do_scale_param, jvp_attn_backend="math")
    return net.to(dtype)


def undropped_draws(
    t: torch.Tensor, s: torch.Tensor, s_prime: torch.Tensor, beta: torch.Tensor, noise: torch.Tensor
) -> StepDraws:
    """Draws with chosen times, β and noise and no label dropped (to call the objective directly)."""
    return StepDraws(t, s, s_prime, beta, noise, torch.zeros(t.shape[0], dtype=torch.bool))


def one_hot(indices, num_classes: int = 10) -> torch.Tensor:
    return torch.nn.functional.one_hot(torch.as_tensor(indices), num_classes).double()


def run_gloo_workers(code: str, world_size: int = 2, timeout: float = 60) -> list[dict]:
    """Run ``code`` in ``world_size`` fresh processes with torchrun-style env on a free local port.

    Each worker prints one ``RESULT <json>`` line; returns the parsed results in process order.
    """
    import json
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    base = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            env={
                **base,
                "RANK": str(r),
                "WORLD_SIZE": str(world_size),
                "LOCAL_RANK": str(r),
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
            },
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(world_size)
    ]
    outputs = [p.communicate(timeout=timeout) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in outputs]
    prefix = "RESULT "
    return [
        json.loads(line[len(prefix) :]) for out, _ in outputs for line in out.splitlines() if line.startswith(prefix)
    ]


# Overrides that make the tiny config a seconds-long run (2 steps per tick, no metrics or grids).
QUICK_TINY = [
    "network.hidden_size=32",
    "network.depth=2",
    "network.num_heads=2",
    "training.batch_size=16",
    "training.kimg_per_tick=0.032",
    "training.metrics=[]",
    "training.do_log_image=false",
]


def fork_ranks(fn, world_size: int = 2, timeout: float = 120) -> None:
    """Run ``fn(rank)`` in ``world_size`` forked processes with torchrun-style env on a free local
    port (gloo), and assert that every one exits with code 0."""
    import multiprocessing
    import os

    from tvm.train.slurm import free_port

    port = free_port()

    def main(rank: int) -> None:
        os.environ.update(
            RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_RANK=str(rank),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
        fn(rank)

    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=main, args=(rank,)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=timeout)
    assert [proc.exitcode for proc in procs] == [0] * world_size


def evaluate_on_ranks(cfg, out_dir, world_size: int = 2) -> list[list[dict]]:
    """``evaluate_checkpoints(cfg)`` in forked gloo ranks; each rank's records, in rank order."""
    import json
    from pathlib import Path

    from tvm.eval.evaluate import evaluate_checkpoints
    from tvm.runtime import distributed

    def evaluate(rank: int) -> None:
        distributed.init_distributed(device="cpu")
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(evaluate_checkpoints(cfg)))
        distributed.cleanup()

    fork_ranks(evaluate, world_size)
    return [json.loads(Path(out_dir, f"rank{rank}.json").read_text()) for rank in range(world_size)]
