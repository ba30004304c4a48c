"""Bytes kept for the backward by one TVM loss forward, per ``network.recompute`` mode (CPU proxy).

    PYTHONPATH=. python bench/saved_activations.py [--variant DiT-XL/2-18h] [--resolution 32] [--batch 1]
        [--budgets 1.0,0.7,0.5] [--lift-bans] [--fp8]
        [--saved-values]

Runs the loss forward (explicit-tangent JVP with math attention, teacher, flow-matching branch)
in fp32 on the CPU with random weights and sums the sizes of the distinct storages autograd
saves (saved-tensor hooks; parameters excluded, a storage saved twice counted once), and counts
the FLOPs of the backward, recomputation included (``FlopCounterMode``, matrix products), and the
bytes of each loss term's pass alone (what ``training.split_backward`` holds at a time). Rows: eager per
``network.recompute`` mode, then regionally compiled blocks (``network.compile_scope=blocks``)
per ``network.compile_memory_budget``, partitioned as Inductor would partition them (backend
``aot_eager_decomp_partition``: the same decomposition and min-cut partitioner, no code
generation). This predicts the *relative* effect on GPU memory; bf16 storage and Inductor's
kernels change the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import itertools

import torch
import torch._functorch.config as functorch_config
import torch._functorch.partitioners as partitioners
from torch.utils.flop_counter import FlopCounterMode

from tvm.compiling import set_activation_memory_budget
from tvm.method.times import Guidance, TimeSampling, draw_step
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import DiT


# The min-cut partitioner's recompute bans (``torch._functorch.config.ban_recompute_*``, all on by default). Below a
# budget of 1 the partitioner first tries the cut with the first three lifted (``choose_saved_values_set``), so
# lifting them at budget 1 shows which one makes the difference between the budget-1 cut and the budgeted one.
BANS = ("used_far_apart", "long_fusible_chains", "materialized_backward", "not_in_allowlist")


def loss_inputs(batch: int, resolution: int) -> tuple:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, resolution, resolution, generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (batch,), generator=gen), 1000).float()
    return x, labels, draw_step(gen, batch, tuple(x.shape[1:]), TimeSampling(), Guidance(cfg=2.0), "cpu")


class SavedStorages:
    """Bytes of the distinct non-parameter storages saved for the backward while active (a hook pair)."""

    def __init__(self, net: TVMWrapper):
        self.params = {p.untyped_storage().data_ptr() for p in net.parameters()}
        self.storages: dict[int, int] = {}

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in self.params:
            self.storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())


def saved_bytes_and_flops(net: TVMWrapper, teacher: TVMWrapper, batch: int, resolution: int) -> tuple[int, int]:
    x, labels, draws = loss_inputs(batch, resolution)
    saved = SavedStorages(net)
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        loss = net(x, labels, draws, teacher)["loss"].sum()
    with FlopCounterMode(display=False) as flops:  # not around the forward: Dynamo would not compile under it
        loss.backward()
    net.zero_grad(set_to_none=True)
    return saved.total, flops.get_total_flops()


def saved_bytes_per_term(net: TVMWrapper, teacher: TVMWrapper, batch: int, resolution: int) -> tuple[int, int]:
    """Saved bytes of the terminal-velocity term's pass (JVP, teacher) and of the flow-matching term's
    pass, each counted alone (``training.split_backward`` holds one of them at a time)."""
    x, labels, draws = loss_inputs(batch, resolution)
    terminal, fm = SavedStorages(net), SavedStorages(net)
    with torch.autograd.graph.saved_tensors_hooks(terminal.pack, lambda t: t):
        first = net(x, labels, draws, teacher, phase="terminal")
    first["terminal"].sum().backward()
    with torch.autograd.graph.saved_tensors_hooks(fm.pack, lambda t: t):
        second = net(first["fm_target"], phase="fm")["fm"]
    second.sum().backward()
    net.zero_grad(set_to_none=True)
    return terminal.total, fm.total


@contextlib.contextmanager
def logged_partitions(log: list[list[str]] | None):
    """While active, append to ``log`` the values each compiled graph saves for its backward (as the partitioner
    chose them: op, shape, MiB), one list per partitioned graph; nothing where ``log`` is None."""
    if log is None:
        yield
        return
    choose = partitioners.choose_saved_values_set

    def logging_choose(joint_graph, node_info, memory_budget=1):
        chosen = choose(joint_graph, node_info, memory_budget)
        shapes = [tuple(getattr(n.meta.get("val"), "shape", ())) for n in chosen]
        log.append(
            sorted(f"{n.target} {shape} {partitioners._size_of(n) / 2**20:.2f}" for n, shape in zip(chosen, shapes))
        )
        return chosen

    partitioners.choose_saved_values_set = logging_choose
    try:
        yield
    finally:
        partitioners.choose_saved_values_set = choose


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="DiT-XL/2-18h")
    parser.add_argument("--resolution", type=int, default=32, help="latent resolution")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument(
        "--budgets",
        default="1.0,0.8,0.7,0.5",
        help="network.compile_memory_budget values of the compiled rows ('' for none)",
    )
    parser.add_argument(
        "--lift-bans",
        action="store_true",
        help="also budget-1 rows with each of the partitioner's recompute bans lifted (BANS), alone and in pairs",
    )
    parser.add_argument(
        "--fp8",
        action="store_true",
        help="the blocks' linear layers as FP8 GEMMs in training (network.fp8; DiT.quantize_fp8(static_weight=False))",
    )
    parser.add_argument(
        "--saved-values",
        action="store_true",
        help="also list, per compiled row and graph, the values the partitioner saves (op, shape, MiB)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    model = DiT(args.variant, input_size=args.resolution, in_channels=4, num_classes=1000, init=False)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    if args.fp8:
        model.quantize_fp8(static_weight=False)
    teacher = TVMWrapper(copy.deepcopy(model), data_type="fp32").eval().requires_grad_(False)
    print(
        f"| {args.variant}{', FP8 GEMMs' if args.fp8 else ''}, latent {args.resolution}, batch {args.batch} "
        "| saved GiB | vs eager | backward GFLOP | terminal term's pass GiB | flow-matching term's pass GiB |"
    )
    print("|---|---|---|---|---|---|")
    rows: list[tuple[str, str, float | None, tuple[str, ...]]] = [
        (f"eager, recompute={mode}", mode, None, ()) for mode in ("none", "fm", "all")
    ]
    rows += [
        (f"blocks compiled, budget={b:g}", "none", b, ())
        for b in map(float, args.budgets.split(",") if args.budgets else [])
    ]
    if args.lift_bans:
        for bans in [(ban,) for ban in BANS] + list(itertools.combinations(BANS[:3], 2)):
            rows.append((f"blocks compiled, budget=1, {' and '.join(bans)} lifted", "none", 1.0, bans))
    base = None
    listings: list[tuple[str, int, list[str]]] = []
    for name, mode, budget, bans in rows:
        net = TVMWrapper(model, data_type="fp32", recompute=mode)
        if budget is not None:
            torch._dynamo.reset()
            set_activation_memory_budget(budget)
            for ban in BANS:
                setattr(functorch_config, f"ban_recompute_{ban}", ban not in bans)
            for m in (model, teacher.model):
                m.compile_blocks(backend="aot_eager_decomp_partition")
        log: list[list[str]] | None = [] if args.saved_values and budget is not None else None
        with logged_partitions(log):
            saved, flops = saved_bytes_and_flops(net, teacher, args.batch, args.resolution)
        terminal, fm = saved_bytes_per_term(net, teacher, args.batch, args.resolution)
        listings += [(name, i, values) for i, values in enumerate(log or [])]
        base = base or saved
        print(
            f"| {name} | {saved / 2**30:.3f} | {saved / base:.0%} | {flops / 1e9:.0f} | {terminal / 2**30:.3f} "
            f"| {fm / 2**30:.3f} |",
            flush=True,
        )
    for name, i, values in listings:
        print(f"\n# {name}, compiled graph {i}: {len(values)} saved values (op, shape, MiB)")
        print("\n".join(f"#   {value}" for value in values))
    functorch_config.activation_memory_budget = 1.0
    for ban in BANS:
        setattr(functorch_config, f"ban_recompute_{ban}", True)


if __name__ == "__main__":
    main()
