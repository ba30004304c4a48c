"""FSDP2 against DDP on the GPU: the same TVM steps with the network, teacher and eval EMA sharded.

    torchrun --nproc_per_node=1 bench/fsdp2_step.py [--batch 32] [--steps 4] [--how blocks]

Builds DiT-XL/2-18h twice from the same seed (``bench/step.py``'s random weights), runs the same
steps (same batch, same draws) once as the loop runs a DDP rank (at one GPU: the plain module) and
once sharded with ``tvm.train.sharding.shard_run`` (one unit per block, teacher and eval EMA
too), and prints each step's mean loss for both, their largest relative difference, the step
times and peak memory. With one GPU the shards are whole tensors: this checks that the sharded
code path (DTensor parameters, hooks on the blocks and on the teacher's ``velocity``, the local
gradient norm and EMA updates, fused AdamW on DTensors) computes what the plain path computes.
Per-rank memory of the training state at 2 and 8 GPUs is printed as a computed estimate
(``tvm.train.sharding.state_memory_per_rank``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repository, from any working directory
from step import AB_DEFAULT_VARIANT, Variant, batch, build_state, prepare, time_steps, tvm_step
from tvm.config import compose_config
from tvm.models.dit import count_parameters
from tvm.runtime.build import build_network, build_optimizer
from tvm.train.sharding import shard_run, state_memory_per_rank


def run(cfg, R: int, variant: Variant, sharded: bool, x, labels, args) -> tuple[list[float], float, float]:
    state = build_state(cfg, R, variant, seed=0)
    if sharded:
        shard_run(state.net, state.ema, state.teacher)
        state.optimizer = build_optimizer(cfg.optimizer, state.net.parameters(), "cuda")
    net = prepare(state, "tvm", variant.how, variant.budget, variant.mode)

    def step(i: int) -> torch.Tensor:
        return tvm_step(state, cfg, x, labels, i, net, plan=variant)

    torch.cuda.reset_peak_memory_stats()
    losses = [step(i).mean().item() for i in range(args.steps)]
    ms = statistics.median(time_steps(lambda i: step(100 + i), 1, args.steps))
    return losses, ms, torch.cuda.max_memory_allocated() / 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variant", default=AB_DEFAULT_VARIANT, help="a bench/step.py TVM variant (default: configs')")
    parser.add_argument("--model", default="DiT_XL_2_18h", help="network.model_type (DiT_B_2 for a quick check)")
    args = parser.parse_args()
    dist.init_process_group("nccl")
    torch.cuda.set_device(dist.get_rank())
    torch._dynamo.config.automatic_dynamic_shapes = False
    cfg = compose_config("im256_w2", [f"network.model_type={args.model}"])
    R = 32
    variant = Variant.parse(args.variant)
    x, labels = batch(args.batch, R, 0)
    rows = {}
    for name in ("ddp", "fsdp2"):
        rows[name] = run(cfg, R, variant, name == "fsdp2", x, labels, args)
        print(
            f"# {name}: losses {rows[name][0]}, {rows[name][1]:.1f} ms/step, peak {rows[name][2]:.1f} GiB", flush=True
        )
        torch._dynamo.reset()  # the state of the finished run is freed on return; drop its graphs too
        torch.cuda.empty_cache()
    ddp_losses, fsdp_losses = rows["ddp"][0], rows["fsdp2"][0]
    rel = max(abs(a - b) / abs(a) for a, b in zip(ddp_losses, fsdp_losses))
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, {args.model}, {args.variant}, "
        f"batch {args.batch}, world {dist.get_world_size()}"
    )
    print("| step | DDP mean loss | FSDP2 mean loss |\n|---|---|---|")
    for step, (a, b) in enumerate(zip(ddp_losses, fsdp_losses)):
        print(f"| {step} | {a:.6f} | {b:.6f} |")
    print(f"# largest relative loss difference {rel:.2e}")
    print("| sharding | ms/step | img/s | peak GiB |\n|---|---|---|---|")
    for name, (_, ms, peak) in rows.items():
        print(f"| {name} | {ms:.1f} | {args.batch / ms * 1e3:.1f} | {peak:.1f} |")
    with torch.device("meta"):
        total, _ = count_parameters(build_network(cfg.network, R, 4, 1000, "meta", init=False).model)
    print("| GPUs | DDP state GiB/rank | FSDP2 state GiB/rank (computed) |\n|---|---|---|")
    for world in (1, 2, 8):
        print(
            f"| {world} | {state_memory_per_rank(total, world, 'ddp') / 2**30:.2f} | "
            f"{state_memory_per_rank(total, world, 'fsdp2') / 2**30:.2f} |"
        )
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
