"""CPU tests (TRITON_INTERPRET=1) of the attention-JVP Triton kernels and their two faces.

Ground truth: float64 math attention under torch.func.jvp, then torch.autograd.grad of
<gO, O> + <gT, T> (docs/attention_jvp.md §6). Every kernel output buffer is filled with
NaN before the kernel runs, so an unwritten element fails the comparison. bf16 is checked on the
GPU by bench/attention.py (the interpreter's bf16 dot is wrong).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

from kernels import attention_jvp as kernel_module
from kernels import launch_plans
from kernels.attention_jvp import attention_jvp_backward, attention_jvp_forward
from kernels.op import attention_jvp, attention_with_tangent
from kernels.reference import attention_jvp_math, attention_math

# Relative Frobenius error allowed per input dtype (fp64 runs are fp64 end to end).
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 3e-3}
OUTPUT_NAMES = ("O", "T", "gQ", "gK", "gV", "gtQ", "gtK", "gtV")


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every buffer the kernels write starts as NaN."""

    def nan_empty(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    def nan_empty_like(x):
        return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)

    def nan_empty_output_like(x, token_major_order):
        return kernel_module.output_like(x.shape, x.dtype, x.device, token_major_order).fill_(float("nan"))

    monkeypatch.setattr(kernel_module, "_empty", nan_empty)
    monkeypatch.setattr(kernel_module, "_empty_like", nan_empty_like)
    monkeypatch.setattr(kernel_module, "_empty_output_like", nan_empty_output_like)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.double() - ref).norm() / ref.norm()).item()


def random_inputs(shape, dtype, seed, tangent_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(shape, dtype=torch.float64, generator=gen) for _ in range(6)]
    xs[3:] = [x * tangent_scale for x in xs[3:]]
    grad_o = torch.randn(shape, dtype=torch.float64, generator=gen)
    grad_t = torch.randn(shape, dtype=torch.float64, generator=gen)
    return [x.to(dtype) for x in xs], grad_o, grad_t


def reference(inputs, grad_o, grad_t):
    """[O, T, gQ, gK, gV, gtQ, gtK, gtV] in float64; a None upstream gradient counts as zero."""
    leaves = [x.double().requires_grad_() for x in inputs]
    o, t = attention_jvp_math(*leaves)
    loss = sum((out * g).sum() for out, g in ((o, grad_o), (t, grad_t)) if g is not None)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    return [o.detach(), t.detach(), *grads]


def assert_close(outputs, expected, dtype, names=OUTPUT_NAMES):
    for name, out, ref in zip(names, outputs, expected):
        assert out.dtype == dtype, name
        assert torch.isfinite(out).all(), f"{name} has unwritten (NaN) or non-finite elements"
        if ref.norm() == 0:  # e.g. N = 1, where P = 1 and all gradients but gV, gtV vanish
            assert out.abs().max() <= TOLERANCE[dtype], name
            continue
        err = relative_error(out, ref)
        assert err <= TOLERANCE[dtype], f"{name}: relative error {err:.2e} > {TOLERANCE[dtype]:.0e}"


KERNEL_CASES = [
    (torch.float64, (1, 1, 1, 16)),
    (torch.float64, (1, 3, 17, 72)),
    (torch.float32, (1, 1, 100, 64)),
    (torch.float32, (1, 3, 33, 16)),
    (torch.float16, (1, 2, 40, 64)),
]


@pytest.fixture(params=["two-pass", "one-pass"])
def backward_passes(request, monkeypatch) -> str:
    """Each backward: pass Q then pass KV (default), or the δ kernel then pass KV adding into gQ, gtQ."""
    monkeypatch.setattr(kernel_module, "ONE_PASS_BACKWARD", request.param == "one-pass")
    return request.param


@pytest.mark.parametrize("dtype,shape", KERNEL_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kernels_match_float64_reference(dtype, shape, backward_passes):
    """Fused forward and backward with gO and gT, gO only and gT only (both backward kernels)."""
    inputs, grad_o, grad_t = random_inputs(shape, dtype, seed=sum(shape))
    fwd = attention_jvp_forward(*inputs)
    both = attention_jvp_backward(*inputs, *fwd, grad_o.to(dtype), grad_t.to(dtype))
    assert_close([fwd.o, fwd.t, *both], reference(inputs, grad_o, grad_t), dtype)

    only_o = attention_jvp_backward(*inputs, *fwd, grad_o.to(dtype), None)
    assert only_o[3:] == (None, None, None)
    assert_close(only_o[:3], reference(inputs, grad_o, None)[2:5], dtype, OUTPUT_NAMES[2:5])

    only_t = attention_jvp_backward(*inputs, *fwd, None, grad_t.to(dtype))
    assert_close(only_t, reference(inputs, None, grad_t)[2:], dtype, OUTPUT_NAMES[2:])


def test_primal_forward_and_strided_views():
    """Primal-only forward on non-contiguous [B, H, N, D] views of a [B, N, 3, H, D] buffer."""
    batch, n_ctx, heads, head_dim = 2, 19, 3, 32
    qkv = torch.randn(batch, n_ctx, 3, heads, head_dim, dtype=torch.float64)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    fwd = attention_jvp_forward(q, k, v)
    assert fwd.t is None and fwd.mu is None
    assert_close([fwd.o], [attention_math(q, k, v)], torch.float64, ("O",))
    expected_lse2 = torch.logsumexp(q @ k.transpose(-1, -2) / math.sqrt(head_dim), -1) / math.log(2)
    assert torch.allclose(fwd.lse2, expected_lse2, rtol=0, atol=1e-12)
    mixed_layouts = attention_jvp_forward(q.contiguous(), k, v)
    assert_close([mixed_layouts.o], [attention_math(q, k, v)], torch.float64, ("O",))


def test_outputs_are_token_major_and_gradients_in_their_layout_are_not_copied(monkeypatch, backward_passes):
    """O and T are stored in [B, N, H, D] order, so the model's merge of the heads is a view; upstream
    gradients in that layout (as they come back through it) reach the kernels uncopied, others are copied
    into it, with the same bits either way."""
    conformed = kernel_module._in_output_layout
    copies: list[bool] = []

    def recording(x, dtype, token_major_order):
        out = conformed(x, dtype, token_major_order)
        copies.append(out is not x)
        return out

    monkeypatch.setattr(kernel_module, "_in_output_layout", recording)
    batch, heads, n_ctx, head_dim = 2, 3, 21, 16
    inputs, grad_o, grad_t = random_inputs((batch, heads, n_ctx, head_dim), torch.float32, seed=5)
    fwd = attention_jvp_forward(*inputs)
    for out in (fwd.o, fwd.t):
        assert out.transpose(1, 2).is_contiguous() and out.stride() == (
            n_ctx * heads * head_dim,
            head_dim,
            heads * head_dim,
            1,
        )
        assert out.transpose(1, 2).reshape(batch, n_ctx, heads * head_dim).data_ptr() == out.data_ptr()
    merged = [g.float().transpose(1, 2).reshape(batch, n_ctx, heads * head_dim) for g in (grad_o, grad_t)]
    as_from_merge = [g.view(batch, n_ctx, heads, head_dim).transpose(1, 2) for g in merged]
    contiguous = [g.contiguous() for g in as_from_merge]
    assert not contiguous[0].transpose(1, 2).is_contiguous()
    copies.clear()
    uncopied = attention_jvp_backward(*inputs, *fwd, *as_from_merge)
    assert copies == [False] * 4  # o, gO, t, gT
    copied = attention_jvp_backward(*inputs, *fwd, *contiguous)
    assert copies[4:] == [False, True, False, True]
    for a, b in zip(uncopied, copied):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert_close(list(uncopied), reference(inputs, grad_o, grad_t)[2:], torch.float32, OUTPUT_NAMES[2:])

    # The previous layout (bench/step.py's outputs=contiguous): contiguous O and T, the contiguous gradients
    # uncopied, the same bits; the launch plans of one layout are not taken for the other.
    with kernel_module.token_major_outputs(False):
        fwd_contiguous = attention_jvp_forward(*inputs)
        assert fwd_contiguous.o.is_contiguous() and fwd_contiguous.t.is_contiguous()
        copies.clear()
        grads = attention_jvp_backward(*inputs, *fwd_contiguous, *contiguous)
        assert copies == [False] * 4
    for a, b in zip((*fwd, *uncopied), (*fwd_contiguous, *grads)):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
    assert attention_jvp_forward(*inputs).o.transpose(1, 2).is_contiguous()


def test_zero_tangents_give_zero_t_but_tangent_gradients():
    inputs, grad_o, grad_t = random_inputs((1, 2, 20, 16), torch.float64, seed=1, tangent_scale=0.0)
    fwd = attention_jvp_forward(*inputs)
    assert fwd.t.abs().max() == 0
    grads = attention_jvp_backward(*inputs, *fwd, grad_o, grad_t)
    expected = reference(inputs, grad_o, grad_t)
    assert all(g.norm() > 0 for g in expected[5:])
    assert_close(list(grads), expected[2:], torch.float64, OUTPUT_NAMES[2:])


def test_tangent_is_shift_invariant():
    """A token-shared vector added to tK shifts tS by a per-row constant, which T ignores (§1.2)."""
    inputs, _, _ = random_inputs((1, 2, 24, 16), torch.float64, seed=2)
    shifted = list(inputs)
    shifted[4] = inputs[4] + 5.0 * torch.randn(1, 2, 1, 16, dtype=torch.float64)
    t = attention_jvp_forward(*inputs).t
    t_shifted = attention_jvp_forward(*shifted).t
    assert relative_error(t_shifted, t.double()) < 1e-12


def test_unsupported_inputs_raise_clear_errors(monkeypatch):
    x = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match="shape"):
        attention_with_tangent(x[0], x[0], x[0], x[0], x[0], x[0])
    with pytest.raises(ValueError, match="shape"):
        attention_jvp(x, x[:, :1], x)
    with pytest.raises(TypeError, match="dtype"):
        attention_with_tangent(x, x, x.double(), x, x, x)
    with pytest.raises(TypeError, match="not supported"):
        attention_jvp(x.int(), x.int(), x.int())
    with pytest.raises(ValueError, match="head dim"):
        attention_jvp(*[torch.randn(1, 1, 4, 160)] * 3)
    with pytest.raises(ValueError, match="all of tq, tk, tv"):
        attention_jvp_forward(x, x, x, x, None, None)
    monkeypatch.setattr(kernel_module, "is_interpreting", lambda: False)
    with pytest.raises(ValueError, match="CUDA"):
        attention_jvp(x, x, x)


# ------------------------------------------------------------------ face (a): torch.library op


def custom_op_outputs(*inputs):
    return torch.ops.tvm.attention_jvp_fwd(*inputs, True)[:2]


@pytest.mark.parametrize("face", [attention_with_tangent, custom_op_outputs], ids=["eager", "custom_op"])
def test_op_matches_reference_and_handles_missing_grad_t(face):
    inputs, grad_o, grad_t = random_inputs((2, 1, 21, 16), torch.float64, seed=3)
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, t = face(*leaves)
    grads = torch.autograd.grad((o, t), leaves, (grad_o, grad_t))
    assert_close([o, t, *grads], reference(inputs, grad_o, grad_t), torch.float64)

    o, _ = face(*leaves)
    grads = torch.autograd.grad(o, leaves, grad_o, allow_unused=True)
    grads = [torch.zeros_like(x) if g is None else g for x, g in zip(leaves, grads)]
    assert_close(list(grads), reference(inputs, grad_o, None)[2:], torch.float64, OUTPUT_NAMES[2:])


def test_op_passes_opcheck():
    inputs, _, _ = random_inputs((1, 2, 9, 16), torch.float64, seed=4)
    leaves = [x.requires_grad_() for x in inputs]
    for token_major_order in (True, False):  # the fake's strides are the kernel's, in both layouts
        torch.library.opcheck(torch.ops.tvm.attention_jvp_fwd.default, (*leaves, token_major_order))


def test_op_compiles_without_graph_break():
    inputs, grad_o, grad_t = random_inputs((1, 1, 12, 16), torch.float64, seed=5)

    def loss_fn(q, k, v, tq, tk, tv):
        o, t = attention_with_tangent(q, k, v, tq, tk, tv)
        return (o * grad_o).sum() + (t * grad_t).sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    leaves = [x.clone().requires_grad_() for x in inputs]
    grads = torch.autograd.grad(compiled(*leaves), leaves)
    assert_close(list(grads), reference(inputs, grad_o, grad_t)[2:], torch.float64, OUTPUT_NAMES[2:])


# ----------------------------------------------------- face (b): autograd.Function with a jvp rule


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_function_under_func_jvp_is_differentiable_through_primal_and_tangent(dtype):
    inputs, grad_o, grad_t = random_inputs((1, 3, 17, 16), dtype, seed=6)
    leaves = [x.clone().requires_grad_() for x in inputs]
    o, t = torch.func.jvp(attention_jvp, tuple(leaves[:3]), tuple(leaves[3:]))
    grads = torch.autograd.grad((o, t), leaves, (grad_o.to(dtype), grad_t.to(dtype)))
    assert_close([o, t, *grads], reference(inputs, grad_o, grad_t), dtype)


def test_function_without_jvp_returns_primal_and_flash_gradients():
    inputs, grad_o, _ = random_inputs((2, 2, 15, 16), torch.float64, seed=7)
    leaves = [x.clone().requires_grad_() for x in inputs[:3]]
    o = attention_jvp(*leaves)
    grads = torch.autograd.grad(o, leaves, grad_o)
    expected = reference(inputs, grad_o, None)
    assert_close([o, *grads], [expected[0], *expected[2:5]], torch.float64, ("O", "gQ", "gK", "gV"))


def test_function_with_dual_tensors_and_partial_tangents():
    """torch.autograd.forward_ad with only q dual: missing tangents count as zero."""
    import torch.autograd.forward_ad as fwAD

    inputs, _, _ = random_inputs((1, 1, 10, 16), torch.float64, seed=8)
    q, k, v, tq = inputs[:4]
    with fwAD.dual_level():
        o = attention_jvp(fwAD.make_dual(q, tq), k, v)
        o_primal, t = fwAD.unpack_dual(o)
    o_ref, t_ref = attention_jvp_math(q, k, v, tq, torch.zeros_like(k), torch.zeros_like(v))
    assert_close([o_primal, t], [o_ref, t_ref], torch.float64, ("O", "T"))


@pytest.mark.parametrize("face", ["op", "func.jvp"])
def test_faces_under_ddp(face, tmp_path):
    """Single-process gloo DDP: gradients reach the wrapped module's parameters through O and T."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        torch.manual_seed(9)
        proj = torch.nn.Linear(16, 6 * 16, dtype=torch.float64)
        x = torch.randn(1, 2, 10, 16, dtype=torch.float64)

        def loss(module, attention):
            q, k, v, tq, tk, tv = module(x).chunk(6, dim=-1)
            o, t = attention(q, k, v, tq, tk, tv)
            return o.square().sum() + t.square().sum()

        def with_func_jvp(q, k, v, tq, tk, tv):
            return torch.func.jvp(attention_jvp, (q, k, v), (tq, tk, tv))

        ours = attention_with_tangent if face == "op" else with_func_jvp
        model = DistributedDataParallel(proj)
        loss(model, ours).backward()
        got = [p.grad.clone() for p in proj.parameters()]
        proj.zero_grad()
        loss(proj, attention_jvp_math).backward()
        for g, ref in zip(got, [p.grad for p in proj.parameters()]):
            assert relative_error(g, ref) < 1e-12
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------ launch plans (host fast path)


def _count_dispatches(monkeypatch):
    """Counts launches that go through Triton's autotuner/JIT rather than a recorded plan."""
    calls = []
    original = launch_plans.launch_and_record

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(launch_plans, "launch_and_record", counting)
    return calls


@pytest.mark.parametrize("grads", ["both", "o_only", "t_only"])
def test_launch_plans_repeat_dispatch_results(monkeypatch, grads):
    """The second call launches through the recorded plans and gives bitwise the same outputs."""
    calls = _count_dispatches(monkeypatch)
    launch_plans.clear()
    inputs, grad_o, grad_t = random_inputs((2, 3, 23, 16), torch.float64, seed=10)
    grad_o = None if grads == "t_only" else grad_o
    grad_t = None if grads == "o_only" else grad_t

    def run():
        fwd = attention_jvp_forward(*inputs)
        return [fwd.o, fwd.t, *attention_jvp_backward(*inputs, *fwd, grad_o, grad_t)]

    first = run()
    assert len(calls) == 3 and len(launch_plans.recorded()) == 2
    second = run()
    assert len(calls) == 3, "second call did not use the launch plans"
    for a, b in zip(first, second):
        assert (a is None and b is None) or torch.equal(a, b)
    expected = reference(inputs, grad_o, grad_t)
    outputs = [torch.zeros_like(inputs[0]) if g is None else g for g in second]
    assert_close(outputs, expected, torch.float64)

    with launch_plans.fast_launch(False):
        third = run()
    assert launch_plans.FAST_LAUNCH, "fast_launch did not restore the switch"
    assert len(calls) == 6
    for a, b in zip(first, third):
        assert (a is None and b is None) or torch.equal(a, b)


def test_one_pass_backward_equals_two_pass_and_repeats_through_its_plan(monkeypatch):
    """The one-pass backward (atomic adds into gQ, gtQ) equals the two-pass one to fp64 rounding, has a
    plan of its own (δ kernel, pass KV), and its second call through the plan repeats the first."""
    calls = _count_dispatches(monkeypatch)
    launch_plans.clear()
    inputs, grad_o, grad_t = random_inputs((2, 3, 23, 16), torch.float64, seed=12)
    fwd = attention_jvp_forward(*inputs)
    two_pass = attention_jvp_backward(*inputs, *fwd, grad_o, grad_t)
    monkeypatch.setattr(kernel_module, "ONE_PASS_BACKWARD", True)
    first = attention_jvp_backward(*inputs, *fwd, grad_o, grad_t)
    kernels = [getattr(c, "fn", c) for c in calls[-2:]]
    assert [k.__name__ for k in kernels] == ["_attention_jvp_bwd_delta_kernel", "_attention_jvp_bwd_kv"]
    assert len(launch_plans.recorded()) == 3  # forward, two-pass backward, one-pass backward
    second = attention_jvp_backward(*inputs, *fwd, grad_o, grad_t)
    assert len(calls) == 5, "the one-pass call did not use its plan"
    for a, b, c in zip(two_pass, first, second):
        assert torch.equal(b, c)
        assert relative_error(b, a) < 1e-13
    assert kernel_module._attention_jvp_bwd_kv_fused_q_kernel.reset_to_zero == ["GQ", "GTQ"]


def test_backward_passes_from_the_environment(monkeypatch):
    monkeypatch.delenv("TVM_ATTENTION_BACKWARD", raising=False)
    assert kernel_module._one_pass_from_environment() is False
    monkeypatch.setenv("TVM_ATTENTION_BACKWARD", "one-pass")
    assert kernel_module._one_pass_from_environment() is True
    monkeypatch.setenv("TVM_ATTENTION_BACKWARD", "single")
    with pytest.raises(ValueError, match="TVM_ATTENTION_BACKWARD='single': expected two-pass"):
        kernel_module._one_pass_from_environment()


def test_launch_plan_tail_matches_kernel_signature(monkeypatch):
    """A plan's argument list is the kernel's full signature with the config's meta-parameters."""
    launch_plans.clear()
    inputs, _, _ = random_inputs((1, 2, 12, 16), torch.float64, seed=11)
    attention_jvp_forward(*inputs)
    ((key, plan),) = launch_plans.recorded().items()
    kernel = kernel_module._attention_jvp_fwd_kernel
    names = kernel.arg_names
    (launch,) = plan
    assert 10 + len(launch.tail) == len(names)
    by_name = dict(zip(names[10:], launch.tail))
    assert by_name["N_CTX"] == 12 and by_name["H"] == 2 and by_name["HAS_TANGENT"] is True
    assert (by_name["sb"], by_name["sh"], by_name["sn"]) == inputs[0].stride()[:3]
    assert by_name["SCALE"] == pytest.approx(0.25) and by_name["HEAD_DIM"] == 16
    assert by_name["BLOCK_M"] == 16 and by_name["BLOCK_N"] == 16
    assert launch.grid == (1, 2, 1)


def test_inputs_without_a_plan_take_the_dispatch_path(monkeypatch):
    """Unaligned pointers, differing layouts or dtypes: no plan, same results as before."""
    calls = _count_dispatches(monkeypatch)
    launch_plans.clear()
    base = torch.randn(6 * 2 * 2 * 9 * 16 + 1, dtype=torch.float64)
    unaligned = [base[1 + i * 576 : 1 + (i + 1) * 576].view(2, 2, 9, 16) for i in range(6)]
    assert unaligned[0].data_ptr() % 16 != 0
    assert launch_plans.input_key(tuple(unaligned)) is None
    transposed = [x.transpose(1, 2).contiguous().transpose(1, 2) for x in unaligned]
    mixed = [unaligned[0].contiguous(), *transposed[1:]]
    assert launch_plans.input_key(tuple(mixed)) is None
    for inputs in (unaligned, mixed, unaligned):
        fwd = attention_jvp_forward(*inputs)
        assert_close([fwd.o, fwd.t], list(attention_jvp_math(*inputs)), torch.float64, ("O", "T"))
    assert len(calls) == 3 and not launch_plans.recorded()


def test_launch_hooks_and_arguments_of_a_compiled_plan(monkeypatch):
    """The GPU branch of a plan: CompiledKernel.run gets the JIT path's argument list."""

    class Chain:  # like triton.knobs' HookChain
        def __init__(self):
            self.calls = []

        def __call__(self, metadata):
            for call in self.calls:
                call(metadata)

    class Knobs:
        launch_enter_hook = Chain()
        launch_exit_hook = Chain()

    class Compiled:
        function, packed_metadata = "function", ("packed",)

        def __init__(self):
            self.launched = []

        def run(self, *args):
            self.launched.append(args)

        def launch_metadata(self, grid, stream, *args):
            return ("metadata", grid, stream, len(args))

    monkeypatch.setattr(launch_plans, "_RUNTIME_KNOBS", Knobs)
    compiled = Compiled()
    launch = object.__new__(launch_plans.Launch)
    launch.grid, launch.tail, launch.compiled, launch.device, launch.interpreted = (3, 4, 1), (7, 8), compiled, 0, None
    launch.launcher, launch.function, launch.packed = compiled.run, compiled.function, compiled.packed_metadata
    launch.stream = lambda device: 1000 + device
    launch("a", "b")
    assert compiled.launched[-1] == (3, 4, 1, 1000, "function", ("packed",), None, None, None, "a", "b", 7, 8)
    Knobs.launch_enter_hook.calls.append(print)
    launch("a", "b")
    assert compiled.launched[-1] == (
        3,
        4,
        1,
        1000,
        "function",
        ("packed",),
        ("metadata", (3, 4, 1), 1000, 4),
        Knobs.launch_enter_hook,
        Knobs.launch_exit_hook,
        "a",
        "b",
        7,
        8,
    )


# ------------------------------------------------------------------ cache directory (binaries, autotuning)


class _RecordingAutotuner:
    """Stands for a Triton autotuner: a launch records Triton's cache directory (knob and environment)
    and whether the autotuner stores its results, as the JIT and the tuning would read them."""

    def __init__(self):
        self.cache_results = False
        self.seen = []

    def __getitem__(self, grid):
        from triton import knobs

        def launch(*args, **kwargs):
            self.seen.append((knobs.cache.dir, os.environ.get("TRITON_CACHE_DIR"), self.cache_results))

        return launch


def test_cache_dir_holds_during_our_launches_only(monkeypatch, tmp_path):
    """With a cache directory set, each launch through the autotuner and the JIT sees it as Triton's
    cache directory with result storing on; before and after, Triton's settings (e.g. the directory
    Inductor put in the environment) and the autotuner's own flag are as they were."""
    from triton import knobs

    monkeypatch.setenv("TRITON_INTERPRET", "0")  # the interpreter compiles nothing: the directory is left alone
    inductor = str(tmp_path / "inductor-triton")
    monkeypatch.setenv("TRITON_CACHE_DIR", inductor)
    kernel = _RecordingAutotuner()
    ours = tmp_path / "run" / "triton-cache"
    previous = launch_plans.use_cache_dir(ours)
    try:
        launch_plans.launch_and_record(kernel, lambda meta: (1,), (), (), {}, 0, record=False)
    finally:
        restored = launch_plans.use_cache_dir(previous)
    launch_plans.launch_and_record(kernel, lambda meta: (1,), (), (), {}, 0, record=False)
    assert previous is None and restored == ours and launch_plans.cache_dir() is None
    assert kernel.seen == [(str(ours), str(ours), True), (inductor, inductor, False)]
    assert knobs.cache.dir == os.environ["TRITON_CACHE_DIR"] == inductor and not kernel.cache_results


def test_cache_dir_is_not_touched_under_the_interpreter(tmp_path):
    kernel = _RecordingAutotuner()
    previous = launch_plans.use_cache_dir(tmp_path)
    try:
        launch_plans.launch_and_record(kernel, lambda meta: (1,), (), (), {}, 0, record=False)
    finally:
        launch_plans.use_cache_dir(previous)
    assert kernel.seen[0][0] != str(tmp_path) and not kernel.seen[0][2]


def test_our_autotuners_have_the_result_storing_flag():
    """The installed Triton's autotuner reads ``cache_results`` at each tuning (Triton 3.6 to 3.9)."""
    for kernel in (
        kernel_module._attention_jvp_fwd_kernel,
        kernel_module._attention_jvp_bwd_q_kernel,
        kernel_module._attention_jvp_bwd_kv_kernel,
        kernel_module._attention_jvp_bwd_kv_fused_q_kernel,
        kernel_module._attention_jvp_bwd_delta_kernel,
    ):
        assert isinstance(kernel.cache_results, bool), type(kernel).__name__


def test_pruned_tuning_spaces():
    """What each backward's autotuner may pick on the GPU: the short-sequence candidates only for N ≤ 512,
    the one-pass pass KV's low-spill tiles at every N, and no tile timed twice."""

    def tiles(configs, n_ctx, dtype=torch.bfloat16, d_pad=64):
        kept = kernel_module._prune(configs, {"Q": torch.empty(0, dtype=dtype), "D_PAD": d_pad, "N_CTX": n_ctx})
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]

    two_pass, one_pass = kernel_module._BWD_KV_CONFIGS, kernel_module._BWD_KV_FUSED_Q_CONFIGS
    for n_ctx in (256, 1024):
        assert len(set(tiles(one_pass, n_ctx))) == len(tiles(one_pass, n_ctx))
        assert {(16, 64, 4, 2), (32, 64, 8, 2)} <= set(tiles(one_pass, n_ctx))
    assert (16, 64, 4, 2) in tiles(two_pass, 256) and (16, 64, 4, 2) not in tiles(two_pass, 1024)
    assert tiles(one_pass, 1024) == tiles(two_pass, 1024) + [(16, 64, 4, 2), (32, 64, 8, 2)]
    assert tiles(one_pass, 1024, torch.float32) == [(32, 32, 4, 1)]
    assert all(m <= 64 and n <= 64 for m, n, _, _ in tiles(one_pass, 256, d_pad=128))
