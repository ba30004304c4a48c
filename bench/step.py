"""Training-step throughput of DiT-XL/2 (18 heads) with the paper's settings, on one GPU.

    PYTHONPATH=. python bench/step.py [--resolution 256] [--batch 32] [--steps 8]

Builds the network on the GPU (spectral init there; the zero-initialised layers then get small
random weights so that every path carries signal), and times, with CUDA events after warm-up:

* the full TVM step — loss with its JVP, teacher forward, backward, gradient norm (+ clipping at
  512 px), fused AdamW, eval-EMA and teacher-EMA updates (``tvm.train.update.apply_update``) — for
  each ``--variants`` entry ``JVPMODE:ATTENTION[:compile|:blocks][:recompute=R][:budget=B]``:
  ``autograd`` (torch.func.jvp through the plain forward, upstream's method) or ``explicit``
  (tangents propagated through the layers), the JVP attention ``triton`` (fused kernel) or
  ``math``, optionally ``torch.compile``d as a whole (``:compile``) or block by block (``:blocks``,
  regional compilation), with ``network.recompute`` R and ``network.compile_memory_budget`` B;
* a plain flow-matching step of the same model (one forward, backward, the same update) and
* 1-step generation at batch 256 (network only, no VAE decode), each ``--plain`` way.

``--ab-fast-launch [VARIANT]`` also times one TVM step variant (default: the configs' training
step, ``explicit:triton:blocks:budget=0.7``) with the attention kernels' launch plans on and off
(``kernels.launch_plans.fast_launch``, as ``TVM_ATTENTION_FAST_LAUNCH=0`` would), alternating in
blocks of steps on one compiled state (:func:`ab_fast_launch`), and prints both rows and their ratio.

It first checks that each ``--check`` variant (default: every timed TVM variant, VARIANT included)
computes the same loss and gradients as the reference (autograd JVP, math attention; bf16 autocast,
batch 4). FLOPs: one forward of the token-wise layers plus attention
(``DiT.forward_flops``; 236 GFLOP per image at 256 px); a TVM step counts 11 forward
equivalents per image, a flow-matching step 3. MFU uses ``--peak`` (800 TFLOP/s, the bf16 rate
measured on the lent H100).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import statistics
import tempfile
import time
import traceback
from collections.abc import Callable

import torch
import torch._functorch.config as functorch_config
import torch._inductor.config as inductor_config
import triton

from bench.attention import relative_error
from kernels import attention_jvp, launch_plans
from tvm.compiling import allow_tracing_this_package, compile_model, compile_options, set_activation_memory_budget
from tvm.config import compose_config
from tvm.data.encoders import StabilityVAEEncoder
from tvm.models.attention import contiguous_kernel_operands
from tvm.method.objective import interpolate
from tvm.method.sampler import sample
from tvm.method.times import draw_step
from tvm.models.dit import FlowMapInput
from tvm.runtime.build import build_network, build_optimizer, guidance, time_sampling, train_in_fp8
from tvm.train.ema import make_ema
from tvm.train.state import Progress, RunState
from tvm.train.step_graph import StepGraph
from tvm.train.ema import fused_ema_devices
from tvm.train.update import Batching, apply_update, loss_and_backward, take


STARTED = time.perf_counter()  # for the elapsed seconds printed after each row (a row cut by a call limit)


@dataclasses.dataclass(frozen=True)
class Variant:
    """A TVM step variant ``JVPMODE:ATTENTION[:HOW][:recompute=R][:budget=B][:mode=M][:estimator=E]
    [:split=1][:fm_budget=F][:rounds=K][:graph=1][:cdt=1][:pdl=1][:bwd=one-pass][:operands=views]
    [:outputs=contiguous][:ema=per-tensor][:fp8=1]``, e.g.
    ``explicit:triton:blocks:budget=0.5``:
    ``HOW`` = eager | compile | blocks, ``R`` = ``network.recompute``, ``B`` = ``network.compile_memory_budget``,
    ``M`` the torch.compile mode, ``E`` how the partitioner estimates the cost of recomputing an op under a
    budget below 1 (:func:`set_recompute_estimator`; a bench-only experiment, not a config key),
    ``split=1`` = ``training.split_backward``, ``F`` = ``network.compile_memory_budget_fm``, ``K``
    accumulation rounds (the batch in K micro-batches, as ``training.batch_gpu`` = batch / K), ``graph=1``
    = ``training.cuda_graph`` (the whole step as one CUDA graph), ``cdt=1`` = Inductor's coordinate-descent
    tuning of its Triton kernels' launch parameters (a bench-only experiment, not a config key), ``pdl=1`` = Inductor's
    Triton kernels launched with programmatic dependent launch (``triton.enable_pdl``: on Hopper a kernel's launch and
    prologue overlap the previous kernel's tail, and it waits for that kernel's results before its first load; a
    bench-only experiment, not a config key),
    ``bwd=one-pass`` = the attention kernel's one-pass backward (``TVM_ATTENTION_BACKWARD=one-pass``, set for
    this variant's steps only, so that rows with either backward share one process). Three settings that were
    levers (Rounds 11-13) and are now the defaults take their old way back for this variant's steps only:
    ``operands=views`` (the Triton attention's operands as views of the qkv output, copied by the launchers;
    ``tvm.models.attention.contiguous_kernel_operands``), ``outputs=contiguous`` (the attention kernels' O and T
    stored as contiguous ``[B, H, N, D]`` instead of token-major; ``kernels.attention_jvp.token_major_outputs``) and
    ``ema=per-tensor`` (the EMA updates as per-tensor lerps instead of one kernel; ``tvm.train.ema.
    fused_ema_devices``); ``operands=contiguous``, ``outputs=token-major`` and ``ema=fused`` set the defaults.
    ``fp8=1`` = ``network.fp8`` (the blocks' linear layers as FP8 GEMMs in training, forward and backward)."""

    jvp_mode: str
    attention: str
    how: str = "eager"
    recompute: str = "none"
    budget: float = 1.0
    mode: str | None = None  # torch.compile mode, e.g. reduce-overhead (CUDA graphs) or max-autotune-no-cudagraphs
    estimator: str = "flops"  # the partitioner's recompute-cost estimate: flops (PyTorch's default) or profile
    split: bool = False  # training.split_backward: each loss term's backward on its own
    fm_budget: float | None = None  # network.compile_memory_budget_fm (with split)
    rounds: int = 1  # gradient accumulation rounds per step
    graph: bool = False  # training.cuda_graph: the whole step captured as one CUDA graph
    tuned: bool = False  # Inductor's coordinate_descent_tuning for the compiled graphs
    pdl: bool = False  # Inductor's triton.enable_pdl (programmatic dependent launch) for the compiled graphs
    one_pass: bool = False  # the attention kernel's one-pass backward (kernels.attention_jvp.one_pass_backward)
    # None: as the process runs (the modules' defaults)
    contiguous_operands: bool | None = None  # tvm.models.attention.contiguous_kernel_operands
    contiguous_outputs: bool | None = None  # kernels.attention_jvp.token_major_outputs(not this)
    fused_ema: bool | None = None  # tvm.train.ema.fused_ema_devices
    fp8: bool = False  # network.fp8

    @classmethod
    def parse(cls, text: str, recompute: str = "none") -> "Variant":
        fields = text.split(":")
        options = dict(f.split("=", 1) for f in fields[2:] if "=" in f)
        how = next((f for f in fields[2:] if "=" not in f), "eager")
        unknown = set(options) - {"recompute", "budget", "mode", "fm_budget", "rounds", *CHOICES}
        if (
            len(fields) < 2
            or unknown
            or how not in ("eager", "compile", "blocks")
            or any(options.get(name, values[0]) not in values for name, values in CHOICES.items())
            or ("fm_budget" in options and options.get("split") != "1")
            or not options.get("rounds", "1").isdigit()
            or int(options.get("rounds", "1")) < 1
        ):
            choices = "".join(f"[:{name}={'|'.join(values)}]" for name, values in CHOICES.items())
            raise SystemExit(
                f"bad variant {text!r}: JVPMODE:ATTENTION[:eager|compile|blocks][:recompute=R][:budget=B][:mode=M]"
                f"[:fm_budget=F (with split=1)][:rounds=K (>= 1)]{choices}"
            )
        return cls(
            fields[0],
            fields[1],
            how,
            options.get("recompute", recompute),
            float(options.get("budget", 1.0)),
            options.get("mode"),
            options.get("estimator", "flops"),
            options.get("split") == "1",
            float(options["fm_budget"]) if "fm_budget" in options else None,
            int(options.get("rounds", 1)),
            options.get("graph") == "1",
            options.get("cdt") == "1",
            options.get("pdl") == "1",
            options.get("bwd") == "one-pass",
            _switch(options, "operands", "contiguous"),
            _switch(options, "outputs", "contiguous"),
            _switch(options, "ema", "fused"),
            options.get("fp8") == "1",
        )


def _switch(options: dict[str, str], name: str, on: str) -> bool | None:
    """Whether option ``name`` says ``on`` (None where the variant does not give it)."""
    return None if name not in options else options[name] == on


ESTIMATORS = ("flops", "profile")
# The variant options that take one of a few values, the default first (for operands, outputs and ema: the modules'
# defaults).
CHOICES = {
    "estimator": ESTIMATORS,
    "split": ("0", "1"),
    "graph": ("0", "1"),
    "cdt": ("0", "1"),
    "pdl": ("0", "1"),
    "bwd": ("two-pass", "one-pass"),
    "operands": ("contiguous", "views"),
    "outputs": ("token-major", "contiguous"),
    "ema": ("fused", "per-tensor"),
    "fp8": ("0", "1"),
}

DEFAULT_PLAN = Variant("explicit", "triton")  # one round, one backward: how a step runs unless a variant says


def step_settings(plan: Variant) -> contextlib.ExitStack:
    """The module-level settings of ``plan``'s steps: the attention's one-pass backward where it says
    ``bwd=one-pass`` (else as the process runs it, ``TVM_ATTENTION_BACKWARD``), and the kernel operands' and
    outputs' layouts and the EMA kernel where it gives ``operands``, ``outputs`` or ``ema``."""
    stack = contextlib.ExitStack()
    if plan.one_pass:
        stack.enter_context(attention_jvp.one_pass_backward())
    if plan.contiguous_operands is not None:
        stack.enter_context(contiguous_kernel_operands(plan.contiguous_operands))
    if plan.contiguous_outputs is not None:
        stack.enter_context(attention_jvp.token_major_outputs(not plan.contiguous_outputs))
    if plan.fused_ema is not None:
        stack.enter_context(fused_ema_devices(("cuda",) if plan.fused_ema else ()))
    return stack


def build_state(cfg, resolution: int, variant: Variant = Variant("autograd", "math"), seed: int = 0) -> RunState:
    torch.manual_seed(seed)
    cfg.network.jvp_mode, cfg.network.jvp_attn_backend = variant.jvp_mode, variant.attention
    cfg.network.recompute = variant.recompute if variant.jvp_mode == "explicit" else "none"
    cfg.network.fp8 = variant.fp8
    net = build_network(cfg.network, resolution, 4, 1000, device="cuda")
    with torch.no_grad():  # give the zero-initialised layers signal
        for name, p in net.named_parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    train_in_fp8(net, cfg.network)
    return RunState(
        net, make_ema(net), make_ema(net), build_optimizer(cfg.optimizer, net.parameters(), "cuda"), Progress()
    )


def batch(n: int, resolution: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, 4, resolution, resolution, device="cuda", generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (n,), device="cuda", generator=gen), 1000).float()
    return x, labels


def no_sync(last: bool) -> contextlib.AbstractContextManager:
    """The gradient synchronisation of a backward in one process without DDP (none; FSDP2 reduce-scatters
    after every backward by itself, as in the loop: :func:`tvm.train.update.gradient_sync`)."""
    return contextlib.nullcontext()


def step_parts(cfg, x, labels, step: int, plan: Variant = DEFAULT_PLAN) -> list[tuple]:
    """The micro-batches ``(x, labels, draws)`` of step ``step`` (``plan.rounds`` of them), as the loop
    hands them to its step function."""
    gen = torch.Generator(device="cuda").manual_seed(step)
    draws = draw_step(gen, x.shape[0], tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
    batching = Batching.from_config(x.shape[0], x.shape[0] // plan.rounds, 1)
    if batching.rounds == 1:
        return [(x, labels, draws)]
    rows = [batching.positions(0, r).cuda() for r in range(batching.rounds)]
    return [(x[i], labels[i], take(draws, i)) for i in rows]


def run_parts(state: RunState, cfg, net, parts: list[tuple], plan: Variant, events=None) -> torch.Tensor:
    """Forwards and backwards of the micro-batches (:func:`tvm.train.update.loss_and_backward`, each
    loss term's backward on its own with ``plan.split``), then the update; returns the per-sample losses.
    ``events`` (3 CUDA events) are recorded before the first forward, after the last backward and
    after the update (:func:`phase_times`). No host sync, so :class:`StepGraph` can capture it."""
    record = (lambda i: events[i].record()) if events else (lambda i: None)
    n = sum(part[0].shape[0] for part in parts)
    record(0)
    losses = torch.cat(
        [
            loss_and_backward(net, state.teacher, *part, 1 / n, no_sync, plan.split, plan.fm_budget)["loss"]
            for part in parts
        ]
    )
    record(1)
    apply_update(
        state,
        cfg.training.max_grad_norm,
        cfg.training.ema_beta,
        cfg.training.ema_target_beta,
        (~torch.isfinite(losses)).any().float(),
    )
    record(2)
    return losses


def tvm_step(
    state: RunState, cfg, x, labels, step: int, net=None, events=None, plan: Variant = DEFAULT_PLAN
) -> torch.Tensor:
    """One TVM step as the training loop runs it, in ``plan.rounds`` micro-batches (:func:`run_parts`)."""
    torch.compiler.cudagraph_mark_step_begin()  # as the loop does (matters for compile mode reduce-overhead)
    parts = step_parts(cfg, x, labels, step, plan)
    return run_parts(state, cfg, state.net if net is None else net, parts, plan, events)


def graphed_tvm_step(state: RunState, cfg, x, labels, net, plan: Variant) -> Callable[[int], torch.Tensor]:
    """``step → losses`` of the whole step captured as one CUDA graph (``training.cuda_graph``) after
    two eager warm-up steps, as :class:`tvm.train.step_graph.StepGraph` runs it in the loop."""
    graph = StepGraph(lambda parts: {"loss": run_parts(state, cfg, net, parts, plan)}, 2, [state.optimizer])
    return lambda step: graph(step_parts(cfg, x, labels, step, plan))["loss"]


def fm_step(state: RunState, cfg, x, labels, step: int, net=None) -> torch.Tensor:
    torch.compiler.cudagraph_mark_step_begin()
    gen = torch.Generator(device="cuda").manual_seed(step)
    draws = draw_step(gen, x.shape[0], tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
    x_t = interpolate(x, draws.noise, draws.t)
    inputs = FlowMapInput(x_t, draws.t, torch.zeros_like(draws.t), labels, draws.beta)
    F = (state.net if net is None else net).velocity(inputs)
    loss = ((F - (draws.noise - x)) ** 2).flatten(1).mean(1)
    loss.mean().backward()
    apply_update(
        state,
        cfg.training.max_grad_norm,
        cfg.training.ema_beta,
        cfg.training.ema_target_beta,
        (~torch.isfinite(loss)).any().float(),
    )
    return loss.detach()


def release(finished: str) -> None:
    """Free what a finished row held before the next one is built and its peak memory counted: its
    compiled code (Dynamo's caches), the tensors kept alive only by reference cycles (modules, the
    optimizer, compiled wrappers; without ``gc.collect`` they wait for Python's cyclic collector) and
    the allocator's cached blocks. Prints what stays allocated. (The A/B rows of 2026-12-05, run
    without the collect, peaked 7.5 and 15.0 GiB above the same step in a later row; a whole
    training state of DiT-XL/2 is 15.2 GiB, computed.)"""
    torch._dynamo.reset()
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() / 2**30
    print(
        f"# after {finished}: {held:.2f} GiB still allocated; {time.perf_counter() - STARTED:.0f} s since start",
        flush=True,
    )


def time_steps(fn, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


# Kernel-name rules for the profile's categories, first match wins (names as cuBLAS/cuBLASLt,
# Inductor, PyTorch's ATen and our Triton kernels print them on Hopper).
KERNEL_CATEGORIES = (
    ("attention (ours, JVP)", ("_attention_jvp",)),
    ("attention (SDPA)", ("flash", "fmha", "efficient_attention", "attention")),
    ("GEMM", ("gemm", "nvjet", "xmma", "cutlass", "matmul", "sm90_", "splitk", "cublas")),
    ("optimizer + EMAs", ("adam", "multi_tensor", "foreach", "lerp", "_ema_update")),
    ("elementwise / normalisation (Inductor)", ("triton_",)),
    (
        "elementwise / normalisation (ATen)",
        ("elementwise", "reduce", "vectorized", "norm", "copy", "fill", "cat", "index", "gather", "scatter", "softmax"),
    ),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    return next((category for category, keys in KERNEL_CATEGORIES if any(k in lower for k in keys)), "other")


def _busy_ms(intervals: list[tuple[float, float]]) -> float:
    """Length of the union of ``(start, end)`` intervals (µs in, ms out): GPU time with any kernel running."""
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total / 1e3


def launching_ops(events: list[dict], steps: int, categories: tuple[str, ...], top: int = 12) -> list[tuple]:
    """Which host ops launched the kernels of ``categories`` in a chrome trace of ``steps`` calls
    (torch.profiler with ``record_shapes``): ``(ms per call, kernels per call, op, input dims, input types)``,
    largest first, at most ``top``. Kernels are matched to their op by the trace's ``External id``."""
    ops = {
        e["args"]["External id"]: e for e in events if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})
    }
    totals: dict[tuple, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for e in events:
        if e.get("cat") != "kernel" or "dur" not in e or kernel_category(e["name"]) not in categories:
            continue
        op = ops.get(e.get("args", {}).get("External id"), {})
        args = op.get("args", {})
        key = (op.get("name", "?"), str(args.get("Input Dims", "")), str(args.get("Input type", "")))
        totals[key][0] += e["dur"] / 1e3 / steps
        totals[key][1] += 1 / steps
    rows = sorted(((ms, n, *key) for key, (ms, n) in totals.items()), key=lambda row: -row[0])
    return rows[:top]


def phase_times(state: RunState, cfg, x, labels, net, warmup: int, steps: int, plan: Variant) -> dict[str, float]:
    """Median ms of the step's phases (CUDA events between them, no host syncs inside a step):
    loss forward and backward, and the update (norm, AdamW, both EMAs)."""
    phases = collections.defaultdict(list)
    for i in range(warmup + steps):
        events = [torch.cuda.Event(enable_timing=True) for _ in range(3)]
        tvm_step(state, cfg, x, labels, i, net, events, plan)
        torch.cuda.synchronize()
        if i >= warmup:
            for name, a, b in (("forward + backward", 0, 1), ("update", 1, 2)):
                phases[name].append(events[a].elapsed_time(events[b]))
    return {name: statistics.median(v) for name, v in phases.items()}


def print_kernel_profile(name: str, run: Callable[[int], object], wall: float, steps: int) -> None:
    """Kernel time of ``run`` by category (torch.profiler over ``steps`` calls, per call), the host gap
    = ``wall`` (the unprofiled median ms of a call) − GPU busy time, and the top kernels."""
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for i in range(steps):
            run(100 + i)
        torch.cuda.synchronize()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            trace = json.load(f)
    kernels = [e for e in trace["traceEvents"] if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    by_category: dict[str, float] = collections.defaultdict(float)
    by_name: dict[str, float] = collections.defaultdict(float)
    for e in kernels:
        by_category[kernel_category(e["name"])] += e["dur"] / 1e3 / steps
        by_name[e["name"]] += e["dur"] / 1e3 / steps
    busy = _busy_ms([(e["ts"], e["ts"] + e["dur"]) for e in kernels]) / steps
    print(
        f"# profile of {name}: {wall:.1f} ms per call (median of {steps}, unprofiled); GPU busy "
        f"{busy:.1f} ms/call; {len(kernels) / steps:.0f} kernels/call"
    )
    print("| category | ms/call | share of call |\n|---|---|---|")
    for category, ms in sorted(by_category.items(), key=lambda kv: -kv[1]):
        print(f"| {category} | {ms:.1f} | {ms / wall:.1%} |")
    print(f"| host gaps (call − GPU busy) | {wall - busy:.1f} | {(wall - busy) / wall:.1%} |")
    print("# top kernels (ms/call):")
    for kernel, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:25]:
        print(f"#   {ms:7.2f}  [{kernel_category(kernel)}] {kernel[:110]}")
    eager = ("elementwise / normalisation (ATen)", "optimizer + EMAs")
    print(
        "# the host ops behind the ATen elementwise and update kernels (ms/call, kernels/call, op, input dims, types):"
    )
    for ms, n, op, dims, types in launching_ops(trace["traceEvents"], steps, eager):
        print(f"#   {ms:7.2f}  {n:6.0f}  {op} {dims[:100]} {types[:80]}")


def profile(cfg, R: int, variant: str, x, labels, args) -> None:
    """Where the time of one TVM step goes (``variant``), or of one 1-step generation call at batch
    ``args.sample_batch`` (``variant`` = ``gen:eager|compile|blocks[+gelu][+cdt][+pdl][:mode=M]``): kernel time by
    category, host gaps, and for a TVM step its phases."""
    if variant.startswith("gen:"):
        state = build_state(cfg, R, DEFAULT_PLAN)
        prepare_plain(state, "gen", variant.removeprefix("gen:"))
        z, lab = generation_inputs(args.sample_batch, R)

        def generate(i: int) -> torch.Tensor:
            return sample(state.ema, z, lab, 1, 2.0)

        wall = statistics.median(time_steps(generate, args.warmup, max(args.steps, 20)))
        print_kernel_profile(f"1-step generation, batch {args.sample_batch}, {variant}", generate, wall, args.steps)
        return
    state, net, plan = tvm_state(cfg, R, variant, args.recompute)

    def run(i: int) -> object:
        return tvm_step(state, cfg, x, labels, i, net, plan=plan)

    with step_settings(plan):
        wall = statistics.median(time_steps(run, args.warmup, args.steps))
        phases = phase_times(state, cfg, x, labels, net, 1, args.steps, plan)
        print_kernel_profile(variant, run, wall, args.steps)
    print("| phase (CUDA events) | ms/step |\n|---|---|")
    for name, ms in phases.items():
        print(f"| {name} | {ms:.1f} |")


def grads_of(state: RunState) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in state.net.parameters() if p.grad is not None])


def check_variants(
    cfg, resolution: int, variants: list[str], recompute: str, n: int = 4
) -> dict[str, dict[str, float]]:
    """Relative difference of loss and gradients of each variant vs autograd JVP with math attention
    (one round of ``n`` images: a variant's ``rounds`` are not checked, its ``split`` is)."""
    x, labels = batch(n, resolution, 1)

    def loss_and_grads(variant: str) -> tuple[torch.Tensor, torch.Tensor]:
        state, net, plan = tvm_state(cfg, resolution, variant, recompute)
        gen = torch.Generator(device="cuda").manual_seed(7)
        draws = draw_step(gen, n, tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
        with step_settings(plan):
            loss = loss_and_backward(net, state.teacher, x, labels, draws, 1 / n, no_sync, plan.split, plan.fm_budget)
        return loss["loss"], grads_of(state)

    l_ref, g_ref = loss_and_grads("autograd:math")
    out = {}
    for variant in variants:
        l_v, g_v = loss_and_grads(variant)
        out[variant] = {
            "loss_rel": float((l_v - l_ref).norm() / l_ref.norm()),
            "grad_rel": float((g_v - g_ref).norm() / g_ref.norm()),
        }
        release(f"check of {variant} (the reference's and this variant's gradients, 2 × 4 B per parameter, held)")
    return out


COMPILE_CACHES = (functorch_config.enable_autograd_cache, inductor_config.fx_graph_cache)  # as PyTorch set them


def set_recompute_estimator(estimator: str) -> None:
    """How the partitioner prices recomputing an op when a memory budget below 1 makes it choose
    (``torch._functorch.config.activation_memory_budget_runtime_estimator``): ``flops`` (PyTorch's
    default: FLOP count, so every pointwise or normalisation op costs the same, nothing) or
    ``profile`` (each candidate op timed alone on the GPU at compile time, so memory-bound ops are
    priced by the bytes they move). Values and gradients are the same either way; only which
    activations are saved and which recomputed changes. The setting is not part of PyTorch's
    compile-cache keys, so the caches are off for ``profile`` (a cached ``flops`` partition would
    be reused otherwise) and on again for ``flops``."""
    functorch_config.activation_memory_budget_runtime_estimator = estimator
    caches_on = estimator == "flops"
    functorch_config.enable_autograd_cache = caches_on and COMPILE_CACHES[0]
    inductor_config.fx_graph_cache = caches_on and COMPILE_CACHES[1]


# Inductor switches a variant can turn on (bench-only experiments): variant option (``cdt=1``, or ``+cdt`` in a plain
# variant) -> Inductor option.
INDUCTOR_SWITCHES = {"cdt": "coordinate_descent_tuning", "pdl": "triton.enable_pdl"}


def inductor_options(*switches: str) -> dict[str, bool]:
    """The Inductor options of the variant options ``switches`` (names of :data:`INDUCTOR_SWITCHES`)."""
    return {INDUCTOR_SWITCHES[name]: True for name in switches}


def compile_kwargs(mode: str, options: dict[str, bool]) -> dict:
    """``torch.compile`` keyword arguments for ``mode``; with Inductor ``options``, the mode's own Inductor options
    plus those (torch.compile takes a mode or options, not both)."""
    if not options:
        return compile_options(mode)
    return {"options": {**torch._inductor.list_mode_options(mode), **options}}


def prepare(
    state: RunState,
    kind: str,
    how: str,
    budget: float = 1.0,
    mode: str | None = None,
    estimator: str = "flops",
    switches: tuple[str, ...] = (),
):
    """The network to call for ``how`` = eager | compile | blocks (see :func:`measure`), its
    compiled graphs keeping ``budget`` of their activations for the backward (choosing what to
    recompute by ``estimator``), compiled in ``mode`` with the Inductor ``switches`` on (:data:`INDUCTOR_SWITCHES`:
    ``cdt``, coordinate-descent tuning, each generated Triton kernel's block sizes and warps searched by timing it at
    compile time; ``pdl``, programmatic dependent launch)."""
    set_activation_memory_budget(budget)
    set_recompute_estimator(estimator)
    options = compile_kwargs(mode or "default", inductor_options(*switches))
    if how == "compile" and kind == "tvm":
        return compile_model(state.net, **options)
    if how == "compile":
        allow_tracing_this_package()
        (state.ema if kind == "gen" else state.net).model.compile(**options)
    elif how == "blocks":
        for module in (state.net, state.teacher, state.ema):
            module.model.compile_blocks(**options)
    return state.net


PLAIN_HOWS = ("eager", "compile", "blocks")
GENERATION_OPTIONS = ("gelu", "fp8")  # plain variant options that replace GEMMs by ones without a backward


def parse_plain(kind: str, variant: str) -> tuple[str, list[str], str | None]:
    """``(how, options, mode)`` of a flow-matching or generation ``variant`` = ``how[+gelu|+fp8][+cdt][+pdl][:mode=M]``
    (``how`` = eager | compile | blocks); ValueError for a malformed one, or a generation option on another kind."""
    how, _, mode = variant.partition(":mode=")
    how, *options = how.split("+")
    if how not in PLAIN_HOWS or set(options) - {*GENERATION_OPTIONS, *INDUCTOR_SWITCHES}:
        raise ValueError(f"bad plain variant {variant!r}: eager|compile|blocks[+gelu|+fp8][+cdt][+pdl][:mode=M]")
    for option in set(options) & set(GENERATION_OPTIONS):
        if kind != "gen":
            raise ValueError(f"+{option} is a generation option (its GEMMs have no backward), not {kind}")
    return how, options, mode or None


def prepare_plain(state: RunState, kind: str, variant: str) -> torch.nn.Module:
    """:func:`prepare` for a flow-matching or generation ``variant`` (:func:`parse_plain`); ``+gelu`` (generation
    only) runs each block's fc1 + GELU as one GEMM (``DiT.fuse_gelu_epilogue``), ``+fp8`` (generation only) the
    blocks' linear layers as FP8 GEMMs (``DiT.quantize_fp8``), ``+cdt`` and ``+pdl`` compile with coordinate-descent
    tuning and programmatic dependent launch (:func:`prepare`)."""
    how, options, mode = parse_plain(kind, variant)
    for option, switch in (("gelu", state.ema.model.fuse_gelu_epilogue), ("fp8", state.ema.model.quantize_fp8)):
        if option in options:
            switch()
    switches = tuple(name for name in INDUCTOR_SWITCHES if name in options)
    return prepare(state, kind, how, mode=mode, switches=switches)


def tvm_state(cfg, resolution: int, variant: str, recompute: str) -> tuple[RunState, torch.nn.Module, Variant]:
    """The run state of a TVM step variant (text, see :class:`Variant`), the network to call and the
    parsed variant (how :func:`tvm_step` runs it)."""
    parsed = Variant.parse(variant, recompute)
    state = build_state(cfg, resolution, parsed)
    switches = ("cdt",) * parsed.tuned + ("pdl",) * parsed.pdl
    net = prepare(state, "tvm", parsed.how, parsed.budget, parsed.mode, parsed.estimator, switches)
    return state, net, parsed


def generation_inputs(n: int, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``[n, 4, R, R]`` and one-hot labels ``[n, 1000]`` of a 1-step generation call."""
    z = torch.randn(n, 4, R, R, device="cuda")
    return z, torch.nn.functional.one_hot(torch.randint(0, 1000, (n,), device="cuda"), 1000).float()


def measure(kind: str, variant: str, cfg, R: int, x: torch.Tensor, labels: torch.Tensor, args) -> list[tuple]:
    """Table rows for one step kind (``tvm``, ``fm`` or ``gen``) and variant; OOM is a row too.

    ``variant``: for ``tvm`` a :class:`Variant`; for ``fm``/``gen`` ``eager``, ``compile`` (the
    whole DiT forward, or for ``tvm`` the whole loss forward) or ``blocks`` (regional: each DiT
    block compiled in place, online net, teacher and EMA).
    """
    plan = DEFAULT_PLAN
    if kind == "tvm":
        state, net, plan = tvm_state(cfg, R, variant, args.recompute)
    else:
        state = build_state(cfg, R, DEFAULT_PLAN)
        if kind == "gen":
            z, lab = generation_inputs(args.sample_batch, R)
            eager = sample(state.ema, z, lab, 1, 2.0).double()  # the same weights unfused, uncompiled, bf16
        net = prepare_plain(state, kind, variant)
    torch.cuda.reset_peak_memory_stats()
    try:
        if kind == "gen":
            times = time_steps(lambda i: sample(state.ema, z, lab, 1, 2.0), args.warmup, max(args.steps, 20))
            ms = statistics.median(times)
            difference = relative_error(sample(state.ema, z, lab, 1, 2.0), eager)
            print(f"# gen {variant}: samples differ from the eager bf16 network's by {difference:.2e} (relative)")
            return [
                (
                    "1-step gen",
                    f"batch {args.sample_batch}, {variant}",
                    ms,
                    args.sample_batch / ms * 1e3,
                    state.ema.model.forward_flops() * args.sample_batch / (ms / 1e3) / args.peak,
                    torch.cuda.max_memory_allocated() / 2**30,
                )
            ]
        if kind == "tvm":
            with step_settings(plan):
                run = (
                    graphed_tvm_step(state, cfg, x, labels, net, plan)
                    if plan.graph
                    else lambda i: tvm_step(state, cfg, x, labels, i, net, plan=plan)
                )
                times = time_steps(run, args.warmup, args.steps)
        else:
            times = time_steps(lambda i: fm_step(state, cfg, x, labels, i, net), args.warmup, args.steps)
    except torch.OutOfMemoryError:
        return [(kind, variant, None, None, None, None)]
    return [step_row(kind, variant, statistics.median(times), state, args)]


def step_row(kind: str, name: str, ms: float, state, args) -> tuple:
    """``(step, variant, ms/step, img/s, MFU, peak GiB)`` of a TVM (11 forward equivalents per
    image) or flow-matching (3) step of ``args.batch`` images taking ``ms``."""
    flops = (11 if kind == "tvm" else 3) * state.net.model.forward_flops() * args.batch
    return (
        kind,
        name,
        ms,
        args.batch / ms * 1e3,
        flops / (ms / 1e3) / args.peak,
        torch.cuda.max_memory_allocated() / 2**30,
    )


# configs/base.yaml: explicit JVP, Triton attention, blocks compiled at budget 0.7, each loss term's backward on its
# own with the flow-matching graphs at budget 1
AB_DEFAULT_VARIANT = "explicit:triton:blocks:budget=0.7:split=1:fm_budget=1.0"


AB_ORDER = (True, False, False, True, True, False)  # the plans on or off in each block of steps: ABBAAB


def ab_fast_launch(variant: str, cfg, R: int, x: torch.Tensor, labels: torch.Tensor, args) -> list[tuple]:
    """Rows of ``variant`` with the attention launch plans on and off, on one built and compiled state.

    The setting alternates in blocks of ``args.steps`` steps (``AB_ORDER``; ``args.warmup`` warm-up
    steps before the first block, one before each other), so that warm-up, memory and order effects
    fall on both; each row is the median over its three blocks and both rows share the peak memory.
    No recompilation between blocks: the custom ops read ``launch_plans.FAST_LAUNCH`` at every call.
    """
    state, net, plan = tvm_state(cfg, R, variant, args.recompute)
    torch.cuda.reset_peak_memory_stats()
    times: dict[bool, list[float]] = {True: [], False: []}
    first_step = 0
    try:
        for block, enabled in enumerate(AB_ORDER):
            warmup = args.warmup if block == 0 else 1
            with launch_plans.fast_launch(enabled):
                times[enabled] += time_steps(
                    lambda i: tvm_step(state, cfg, x, labels, first_step + i, net, plan=plan), warmup, args.steps
                )
            first_step += warmup + args.steps
            block_ms = statistics.median(times[enabled][-args.steps :])
            print(f"# A/B block {block}: plans {'on' if enabled else 'off'}, {block_ms:.1f} ms/step", flush=True)
    except torch.OutOfMemoryError:
        return [("tvm", f"{variant}, plans on/off", None, None, None, None)]
    return [
        step_row(
            "tvm", f"{variant}, plans {'on' if enabled else 'off'}", statistics.median(times[enabled]), state, args
        )
        for enabled in (True, False)
    ]


def checked_variants(check: str | None, timed: list[str]) -> list[str]:
    """The variants ``--check`` names (comma-separated; '' none), or with None every timed TVM variant."""
    return list(dict.fromkeys(timed if check is None else [v for v in check.split(",") if v]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256, help="image resolution (256 or 512)")
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument(
        "--variants",
        default="autograd:triton,explicit:triton,explicit:triton:blocks",
        help="TVM step variants JVPMODE:ATTENTION[:compile|:blocks][:recompute=R][:budget=B], "
        "comma-separated (B: network.compile_memory_budget)",
    )
    parser.add_argument(
        "--plain",
        default="eager,blocks",
        help="flow-matching step and generation: [fm:|gen:]eager|compile|blocks[+gelu][+cdt][+pdl][:mode=M], "
        "comma-separated; a prefix limits an entry to that kind ('' for none); +gelu: generation with fc1 + GELU "
        "as one GEMM; +cdt: Inductor's coordinate-descent tuning; +pdl: programmatic dependent launch",
    )
    parser.add_argument(
        "--recompute",
        default="none",
        choices=["none", "fm", "all"],
        help="network.recompute (activation checkpointing) of explicit-JVP TVM rows without their own recompute=",
    )
    parser.add_argument("--peak", type=float, default=800e12, help="peak FLOP/s for MFU")
    parser.add_argument(
        "--check",
        default=None,
        help="variants to check against autograd:math first, comma-separated ('' for none; default: the timed TVM "
        "variants)",
    )
    parser.add_argument("--sample-batch", type=int, default=256, help="batch of the 1-step generation timing")
    parser.add_argument(
        "--profile",
        default="",
        help="a TVM variant, or gen:eager|compile|blocks[+gelu][+cdt][+pdl][:mode=M] for 1-step generation, to profile "
        "first: kernel time by category, host gaps (and a TVM step's phases)",
    )
    parser.add_argument(
        "--ab-fast-launch",
        nargs="?",
        const=AB_DEFAULT_VARIANT,
        default=None,
        metavar="VARIANT",
        help="also time VARIANT (default %(const)s) with the attention launch plans on and off, alternating",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="check the arguments (every variant parses) and exit before any GPU work"
    )
    args = parser.parse_args()
    variants = [v for v in args.variants.split(",") if v]
    timed = variants + ([args.ab_fast_launch] if args.ab_fast_launch is not None else [])
    checked = checked_variants(args.check, timed)
    profiled_tvm = [args.profile] if args.profile and not args.profile.startswith("gen:") else []
    for v in dict.fromkeys(timed + checked + profiled_tvm):  # bad ones fail before GPU work
        if args.batch % Variant.parse(v).rounds:
            raise SystemExit(f"variant {v!r}: its rounds do not divide the batch {args.batch}")
        if Variant.parse(v).graph and (v not in variants or args.warmup < 3):
            raise SystemExit(f"variant {v!r}: graph=1 times --variants rows only, with --warmup >= 3")
    plain = [
        (kind, how.removeprefix(f"{kind}:"))
        for kind in ("fm", "gen")
        for how in args.plain.split(",")
        if how and (how.split(":")[0] == kind or how.split(":")[0] not in ("fm", "gen"))
    ]
    profiled_plain = [("gen", args.profile.removeprefix("gen:"))] if args.profile.startswith("gen:") else []
    for kind, variant in plain + profiled_plain:
        try:
            parse_plain(kind, variant)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
    if args.dry_run:
        print(
            f"# dry run: {len(variants)} timed, {len(checked)} checked, {len(plain)} flow-matching or generation "
            f"variants{', a profile' if args.profile else ''}: all parse"
        )
        return

    # Every shape gets its own static graph, as in training (fixed per-GPU batch): otherwise the
    # check's batch-4 compile makes Dynamo recompile the timed batch with a dynamic batch size,
    # whose partition (and so its memory) differs from the one training gets.
    torch._dynamo.config.automatic_dynamic_shapes = False
    config = "im256_w2" if args.resolution == 256 else "im512_w2p25"
    cfg = compose_config(config)
    R = StabilityVAEEncoder().latent_shape((3, args.resolution, args.resolution))[1]
    print(
        f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; config {config}, latent {R}x{R}, "
        f"batch {args.batch}, recompute {args.recompute}"
    )
    if checked:
        try:
            for variant, diff in check_variants(cfg, R, checked, args.recompute).items():
                print(f"# check (bf16, batch 4) {variant} vs autograd:math: {diff}", flush=True)
        except torch.OutOfMemoryError:  # the math reference at 512 px needs more than an H100's 80 GB (Round 10)
            print(f"# check of {', '.join(checked)}: out of GPU memory, not checked", flush=True)
        release("the checks")  # outside the handler: its traceback would keep the failed check's tensors alive

    rows = []
    x, labels = batch(args.batch, R, 0)
    if args.profile:
        profile(cfg, R, args.profile, x, labels, args)
        release("the profile")
    if args.ab_fast_launch is not None:
        rows += ab_fast_launch(args.ab_fast_launch, cfg, R, x, labels, args)
        release("the A/B")
    for kind, variant in [("tvm", v) for v in variants] + plain:
        try:
            rows += measure(kind, variant, cfg, R, x, labels, args)
        except Exception as exc:  # noqa: BLE001 - a variant that fails to compile or run is a row, not the end
            traceback.print_exc()
            rows.append((kind, f"{variant} (failed: {type(exc).__name__}: {str(exc)[:80]})", None, None, None, None))
        print("#", rows[-1], flush=True)
        release(f"{kind} {variant}")
    with torch.device("meta"):
        gflops = build_network(cfg.network, R, 4, 1000, "meta", init=False).model.forward_flops() / 1e9

    print("| step | variant | ms/step | img/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for kind, backend, ms, ips, mfu, mem in rows:
        if ms is None:
            print(f"| {kind} | {backend} | OOM or failed | | | |")
            continue
        print(
            f"| {kind} | {backend} | {ms:.1f} | {ips:.1f} | {'' if mfu is None else f'{mfu:.1%}'} | "
            f"{'' if mem is None else f'{mem:.1f}'} |"
        )
    tvm = {b: ms for k, b, ms, *_ in rows if k == "tvm" and ms}
    plans = [ms for k, b, ms, *_ in rows if k == "tvm" and ms and b.endswith((", plans on", ", plans off"))]
    if len(plans) == 2:
        on, off = plans
        print(f"# launch plans on/off step-time ratio: {on / off:.4f} ({off - on:+.2f} ms/step saved by the plans)")
    fm = next((ms for k, b, ms, *_ in rows if k == "fm" and b == "eager" and ms), None)
    if fm:
        print("# TVM/plain step-time ratio:", {b: round(v / fm, 2) for b, v in tvm.items()})
    print(f"# forward FLOPs per image {gflops:.0f} GFLOP; TVM step = 11, FM step = 3 forward equivalents")


if __name__ == "__main__":
    main()
