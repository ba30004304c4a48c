"""Bytes kept for the backward by one TVM loss forward, per ``network.recompute`` mode (CPU proxy).

    PYTHONPATH=. python bench/saved_activations.py [--variant DiT-XL/2-18h] [--resolution 32] [--batch 1]

Runs the loss forward (explicit-tangent JVP with math attention, teacher, flow-matching branch)
eagerly in fp32 on the CPU with random weights and sums the sizes of the distinct storages autograd
saves (saved-tensor hooks; parameters excluded, a storage saved twice counted once). This predicts the *relative* effect of activation recomputation
on GPU memory; compiled graphs and bf16 storage change the absolute numbers.
"""
from __future__ import annotations

import argparse
import copy

import torch

from tvm.method.times import Guidance, TimeSampling, draw_step
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import DiT


def saved_bytes(net: TVMWrapper, teacher: TVMWrapper, batch: int, resolution: int) -> int:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, resolution, resolution, generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (batch,), generator=gen), 1000).float()
    draws = draw_step(gen, batch, tuple(x.shape[1:]), TimeSampling(), Guidance(cfg=2.0), "cpu")
    params = {p.untyped_storage().data_ptr() for p in net.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = net(x, labels, draws, teacher)["loss"].sum()
    del loss
    return sum(storages.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="DiT-XL/2-18h")
    parser.add_argument("--resolution", type=int, default=32, help="latent resolution")
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiT(args.variant, input_size=args.resolution, in_channels=4, num_classes=1000, init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    teacher = TVMWrapper(copy.deepcopy(model), data_type="fp32").eval().requires_grad_(False)
    print(f"| {args.variant}, latent {args.resolution}, batch {args.batch} | saved GiB | vs none |")
    print("|---|---|---|")
    base = None
    for mode in ("none", "fm", "all"):
        net = TVMWrapper(model, data_type="fp32", recompute=mode)
        gib = saved_bytes(net, teacher, args.batch, args.resolution) / 2**30
        base = base or gib
        print(f"| recompute={mode} | {gib:.3f} | {gib / base:.0%} |", flush=True)


if __name__ == "__main__":
    main()
