"""Accuracy check and benchmark of the fused attention-JVP kernels on one GPU.

    PYTHONPATH=. python bench/attention.py

1. Accuracy: relative Frobenius error ‖out − ref‖/‖ref‖ of O, T and the six gradients against a
   float64 reference on the same (rounded) inputs, for both faces (op with explicit tangents;
   autograd.Function under torch.func.jvp), bf16/fp16 at several shapes and fp32 at one shape.
   The naive bf16 math JVP is listed for comparison, and the op with the one-pass backward
   (``TVM_ATTENTION_BACKWARD=one-pass``; its repeats may differ in the last bits: atomic adds).
2. Timing (median of CUDA-event timings after warm-up), H=18, D=64, N ∈ {256, 1024},
   B ∈ {32, 64}, bf16 inputs ~N(0,1): our op (with launch plans, and with FAST_LAUNCH off, i.e.
   Triton's dispatch on every launch), our autograd.Function under torch.func.jvp, math
   attention under torch.func.jvp, and SDPA without JVP; our op with the one-pass backward; our op
   (both backwards) and SDPA also replayed from a CUDA
   graph (no host work per launch, as inside the training step's graph, ``training.cuda_graph``),
   after checking that the replay equals the eager call bit for bit; forward and forward+backward, peak memory
   of forward+backward, TFLOP/s by the counts of docs/attention_jvp.md §5 (u = N²·D per
   batch·head: JVP forward 12u, JVP forward+backward 42u; SDPA forward 4u, forward+backward 14u).
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
import triton

import kernels.attention_jvp as kernels_module
from kernels import launch_plans
from kernels.op import attention_jvp, attention_with_tangent
from kernels.reference import attention_jvp_math

OUTPUT_NAMES = ("O", "T", "gQ", "gK", "gV", "gtQ", "gtK", "gtV")
ACCURACY_LIMITS = {torch.bfloat16: 5e-3, torch.float16: 5e-3, torch.float32: 1e-5}


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64 = out.double()
    if not torch.isfinite(out64).all():
        return float("nan")
    return ((out64 - ref).norm() / ref.norm()).item()


def outputs_and_grads(
    attention: Callable[..., tuple[torch.Tensor, torch.Tensor]],
    inputs: list[torch.Tensor],
    grad_o: torch.Tensor,
    grad_t: torch.Tensor,
) -> list[torch.Tensor]:
    """[O, T, gQ, gK, gV, gtQ, gtK, gtV] for L = <gO, O> + <gT, T>."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    o, t = attention(*leaves)
    grads = torch.autograd.grad((o, t), leaves, (grad_o.to(o.dtype), grad_t.to(t.dtype)))
    return [o.detach(), t.detach(), *grads]


def with_func_jvp(q, k, v, tq, tk, tv):
    return torch.func.jvp(attention_jvp, (q, k, v), (tq, tk, tv))


def accuracy_rows(shape: tuple[int, int, int, int], dtype: torch.dtype, faces: dict) -> list[tuple]:
    """One row per face: errors of the 8 outputs vs float64 on the same dtype-rounded inputs."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen).to(dtype) for _ in range(6)]
    grad_o = torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen)
    grad_t = torch.randn(shape, device="cuda", dtype=torch.float64, generator=gen)
    reference = outputs_and_grads(attention_jvp_math, [x.double() for x in inputs], grad_o, grad_t)
    rows = []
    for face_name, attention in faces.items():
        # The first call takes Triton's dispatch path and records launch plans; the second one
        # launches through the plans. Both must give bitwise the same outputs (deterministic kernels).
        run = with_one_pass_backward(outputs_and_grads) if face_name == ONE_PASS_FACE else outputs_and_grads
        first = run(attention, inputs, grad_o, grad_t)
        outputs = run(attention, inputs, grad_o, grad_t)
        repeat = all(torch.equal(a, b) for a, b in zip(first, outputs))
        errors = [relative_error(out, ref) for out, ref in zip(outputs, reference)]
        rows.append((face_name, str(dtype).replace("torch.", ""), shape, errors, repeat))
    return rows


def with_one_pass_backward(fn: Callable) -> Callable:
    """``fn`` (a forward and its backward) run with ``kernels.attention_jvp.ONE_PASS_BACKWARD`` set."""

    def run(*args):
        with kernels_module.one_pass_backward():
            return fn(*args)

    return run


ONE_PASS_FACE = "op 1-pass"  # the op with the one-pass backward: atomic adds, a repeat may differ in the last bits


def run_accuracy() -> bool:
    ops = {"op": attention_with_tangent, ONE_PASS_FACE: attention_with_tangent}
    ours = {**ops, "func.jvp": with_func_jvp}
    cases = [
        ((2, 18, 256, 64), torch.bfloat16, {**ours, "math-bf16": attention_jvp_math}),
        ((1, 18, 1024, 64), torch.bfloat16, {**ours, "math-bf16": attention_jvp_math}),
        ((2, 3, 100, 64), torch.bfloat16, ops),
        ((2, 16, 256, 72), torch.bfloat16, ops),
        ((2, 18, 256, 64), torch.float16, ops),
        ((1, 4, 256, 64), torch.float32, ops),
    ]
    print("== accuracy: ||out - ref|| / ||ref|| vs float64 on the same inputs ==")
    print(
        f"{'face':9} {'dtype':9} {'shape':18} " + " ".join(f"{n:>8}" for n in OUTPUT_NAMES) + "  ok  repeat-identical"
    )
    all_ok = True
    for shape, dtype, faces in cases:
        for face, dtype_name, shape_, errors, repeat in accuracy_rows(shape, dtype, faces):
            limit = ACCURACY_LIMITS[dtype]
            ok = all(e <= limit for e in errors)
            if not face.startswith("math"):
                all_ok &= ok and (repeat or face == ONE_PASS_FACE)
            cells = " ".join(f"{e:8.1e}" for e in errors)
            print(
                f"{face:9} {dtype_name:9} {str(shape_):18} {cells}  {'yes' if ok else 'NO'}  "
                f"{'yes' if repeat else 'NO'}",
                flush=True,
            )
    print(f"launch plans recorded: {len(launch_plans.recorded())}")
    return all_ok


def median_ms(fn: Callable[[], object], warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def cuda_graphed(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` captured once as a CUDA graph (after 3 warm-up calls on a side stream); the returned
    callable replays it and returns the captured call's outputs, which each replay rewrites. This is
    how the op runs inside the training step's graph (``training.cuda_graph``): no host work per launch."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()

    def replay() -> object:
        graph.replay()
        return outputs

    return replay


def peak_gib(fn: Callable[[], object]) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**30


def upstream_gradients(shape: tuple[int, ...], count: int = 2) -> list[torch.Tensor]:
    """Random bf16 upstream gradients in the layout of the kernels' outputs, as the model's merge of the
    heads hands them back (a gradient in another layout would be copied inside the timed backward)."""
    return [
        kernels_module.output_like(shape, torch.bfloat16, torch.device("cuda")).copy_(torch.randn(shape))
        for _ in range(count)
    ]


def timing_rows(batch: int, n_ctx: int, heads: int = 18, head_dim: int = 64) -> list[tuple]:
    shape = (batch, heads, n_ctx, head_dim)
    inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    grad_o, grad_t = upstream_gradients(shape)
    q, k, v = inputs[:3]
    u = batch * heads * n_ctx**2 * head_dim

    def jvp_fwd_bwd(attention, grads=(grad_o, grad_t)):
        def run():
            # Detached: outputs holding their autograd graph would keep the inputs' gradient accumulators
            # alive, bound to the stream they were made on; a later CUDA-graph capture of this backward then
            # fails when that was the default stream ("operation would make the legacy stream depend on a
            # capturing blocking stream"; H100, torch 2.11, 2026-12-07).
            o, t = attention(*inputs)
            return (o.detach(), t.detach(), *torch.autograd.grad((o, t), inputs, grads))

        return run

    def sdpa_fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v)
        return torch.autograd.grad(o, (q, k, v), grad_o)

    def sdpa(q, k, v, *_):
        return F.scaled_dot_product_attention(q, k, v)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn(*inputs)

        return run

    def dispatch_path(fn):
        def run():
            with launch_plans.fast_launch(False):
                fn()

        return run

    def contiguous_outputs(fn):
        """O and T stored contiguous, as before 2026-12-07 (Round 12's A/B), with gradients in that layout."""

        def run():
            with kernels_module.token_major_outputs(False):
                return fn()

        return run

    one_pass = with_one_pass_backward(jvp_fwd_bwd(attention_with_tangent))
    contiguous = contiguous_outputs(jvp_fwd_bwd(attention_with_tangent, (grad_o.contiguous(), grad_t.contiguous())))
    eager = jvp_fwd_bwd(attention_with_tangent)()
    graphed = cuda_graphed(jvp_fwd_bwd(attention_with_tangent))
    same = all(torch.equal(a, b) for a, b in zip(eager, graphed()))
    print(f"  N={n_ctx} B={batch}: op fwd+bwd replayed from a CUDA graph equals the eager call bit for bit: {same}")
    variants = [
        ("ours: op", no_grad(attention_with_tangent), jvp_fwd_bwd(attention_with_tangent), 12, 42),
        ("ours: op, CUDA graph", cuda_graphed(no_grad(attention_with_tangent)), graphed, 12, 42),
        ("ours: op, O/T contiguous", contiguous_outputs(no_grad(attention_with_tangent)), contiguous, 12, 42),
        (
            "ours: op, O/T contiguous, CUDA graph",
            cuda_graphed(contiguous_outputs(no_grad(attention_with_tangent))),
            cuda_graphed(contiguous),
            12,
            42,
        ),
        ("ours: op, one-pass bwd", no_grad(attention_with_tangent), one_pass, 12, 42),
        (
            "ours: op, one-pass bwd, CUDA graph",
            cuda_graphed(no_grad(attention_with_tangent)),
            cuda_graphed(one_pass),
            12,
            42,
        ),
        (
            "ours: op, no plans",
            dispatch_path(no_grad(attention_with_tangent)),
            dispatch_path(jvp_fwd_bwd(attention_with_tangent)),
            12,
            42,
        ),
        ("ours: func.jvp", no_grad(with_func_jvp), jvp_fwd_bwd(with_func_jvp), 12, 42),
        ("math func.jvp", no_grad(attention_jvp_math), jvp_fwd_bwd(attention_jvp_math), 12, 42),
        ("SDPA (no JVP)", no_grad(sdpa), sdpa_fwd_bwd, 4, 14),
        ("SDPA (no JVP), CUDA graph", cuda_graphed(no_grad(sdpa)), cuda_graphed(sdpa_fwd_bwd), 4, 14),
    ]
    rows = []
    for name, fwd, fwd_bwd, fwd_units, total_units in variants:
        slow = name.startswith("math")
        warmup, iters = (2, 5) if slow else (5, 30)
        fwd_ms = median_ms(fwd, warmup, iters)
        total_ms = median_ms(fwd_bwd, warmup, iters)
        mem = peak_gib(fwd_bwd)
        rows.append(
            (n_ctx, batch, name, fwd_ms, fwd_units * u / fwd_ms / 1e9, total_ms, total_units * u / total_ms / 1e9, mem)
        )
        print(
            f"  timed N={n_ctx} B={batch} {name}: fwd {fwd_ms:.3f} ms, fwd+bwd {total_ms:.3f} ms, "
            f"peak {mem:.2f} GiB",
            flush=True,
        )
    return rows


def print_timing_table(rows: list[tuple]) -> None:
    print("\n== timing: bf16, H=18, D=64; median ms (TFLOP/s by spec counts); peak GiB of fwd+bwd ==")
    print("| N | B | implementation | fwd ms | fwd TF/s | fwd+bwd ms | fwd+bwd TF/s | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    for n_ctx, batch, name, fwd_ms, fwd_tf, total_ms, total_tf, mem in rows:
        print(
            f"| {n_ctx} | {batch} | {name} | {fwd_ms:.3f} | {fwd_tf:.0f} "
            f"| {total_ms:.3f} | {total_tf:.0f} | {mem:.2f} |"
        )


def print_kernel_profile(batch: int, n_ctx: int, heads: int = 18, head_dim: int = 64) -> None:
    """CUDA time per kernel of 10 op forward+backward calls (torch.profiler), vs wall time."""
    shape = (batch, heads, n_ctx, head_dim)
    inputs = [torch.randn(shape, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    grad_o, grad_t = upstream_gradients(shape)

    def step():
        o, t = attention_with_tangent(*inputs)
        torch.autograd.grad((o, t), inputs, (grad_o, grad_t))

    for name, one_pass in (("op fwd+bwd", False), ("op fwd+bwd, one-pass bwd", True)):
        with kernels_module.one_pass_backward(one_pass):
            step()
            torch.cuda.synchronize()
            with torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            ) as prof:
                for _ in range(10):
                    step()
                torch.cuda.synchronize()
        print(f"\n== profile: {name} x10, N={n_ctx} B={batch} ==")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=8, max_name_column_width=40))
    print_host_overhead()


def print_host_overhead(calls: int = 300) -> None:
    """Host µs per call on a tiny shape, where the GPU work is far shorter than the launch.

    Each case runs with launch plans (the default) and through Triton's dispatch path
    (``FAST_LAUNCH = False``: autotuner and JIT on every call, as before the plans), next to
    floors that no launcher can go below (an empty autograd.Function, SDPA).
    """
    inputs = [torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(6)]
    grad = torch.randn_like(inputs[0])
    fwd = kernels_module.attention_jvp_forward(*inputs)

    def custom_op(*inputs):
        return torch.ops.tvm.attention_jvp_fwd(*inputs, kernels_module.TOKEN_MAJOR_OUTPUTS)

    def op_step(face):
        def run():
            o, t = face(*inputs)[:2]
            torch.autograd.grad((o, t), inputs, (grad, grad))

        return run

    class Identity(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, tq, tk, tv):
            return q.view_as(q), k.view_as(k)

        @staticmethod
        def backward(ctx, go, gt):
            return go, gt, go, gt, go, gt

    def sdpa_step():
        o = F.scaled_dot_product_attention(*inputs[:3])
        torch.autograd.grad(o, inputs[:3], grad)

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / calls * 1e6

    cases = {
        "forward launcher (1 kernel)": lambda: kernels_module.attention_jvp_forward(*inputs),
        "backward launcher (2 kernels)": lambda: kernels_module.attention_jvp_backward(*inputs, *fwd, grad, grad),
        "attention_with_tangent fwd+bwd": op_step(attention_with_tangent),
        "tvm::attention_jvp_fwd fwd+bwd": op_step(custom_op),
        "func.jvp(attention_jvp) fwd+bwd": op_step(with_func_jvp),
    }
    floors = {
        "input key (6 tensors)": lambda: launch_plans.input_key(tuple(inputs)),
        "torch.empty_like": lambda: torch.empty_like(grad),
        "empty autograd.Function fwd+bwd": op_step(Identity.apply),
        "SDPA fwd+bwd (no JVP)": sdpa_step,
    }
    print("\n== host time per call (tiny shape 1x1x64x64, us) ==")
    print(f"{'case':34} {'plans':>8} {'no plans':>9}")
    for name, fn in cases.items():
        with_plans = timed(fn)
        with launch_plans.fast_launch(False):
            without = timed(fn)
        print(f"{name:34} {with_plans:8.1f} {without:9.1f}")
    for name, fn in floors.items():
        print(f"{name:34} {timed(fn):8.1f}")


def print_best_configs() -> None:
    kernels = {
        "fwd": kernels_module._attention_jvp_fwd_kernel,
        "bwd_q": kernels_module._attention_jvp_bwd_q_kernel,
        "bwd_kv": kernels_module._attention_jvp_bwd_kv_kernel,
        "bwd_kv+q": kernels_module._attention_jvp_bwd_kv_fused_q_kernel,  # the one-pass backward
    }
    print("\n== autotuned configs (key: N, D[, FUSE_Q], dtypes) ==")
    for name, kernel in kernels.items():
        for key, config in kernel.cache.items():
            print(f"{name:8} N={key[0]} D={key[1]} {' '.join(map(str, key[2:]))}: {config}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--profile", default="", help="NxB to profile the op's kernels at, e.g. 256x32")
    parser.add_argument("--sizes", default="256x32,256x64,1024x32,1024x64", help="comma list of NxB")
    args = parser.parse_args()
    props = torch.cuda.get_device_properties(0)
    print(
        f"device: {props.name}; torch {torch.__version__}; triton {triton.__version__}; "
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    accuracy_ok = True if args.skip_accuracy else run_accuracy()
    rows = []
    for size in args.sizes.split(","):
        n_ctx, batch = (int(x) for x in size.split("x"))
        rows += timing_rows(batch, n_ctx)
    print_best_configs()
    if args.profile:
        n_ctx, batch = (int(x) for x in args.profile.split("x"))
        print_kernel_profile(batch, n_ctx)
    print(f"\ndevice: {props.name}; torch {torch.__version__}; triton {triton.__version__}")
    print(f"accuracy within limits (bf16/fp16 5e-3, fp32 1e-5): {'yes' if accuracy_ok else 'NO'}")
    print_timing_table(rows)


if __name__ == "__main__":
    main()
