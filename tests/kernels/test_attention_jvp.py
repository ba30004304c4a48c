"""CPU tests (TRITON_INTERPRET=1) of the attention-JVP Triton kernels and their two faces.

Ground truth: float64 math attention under torch.func.jvp, then torch.autograd.grad of
<gO, O> + <gT, T> (spec ATTENTION_JVP.md §1.5, §5.6). Every kernel output buffer is filled with
NaN before the kernel runs, so an unwritten element fails the comparison. bf16 is checked on the
GPU by bench/attention.py (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import math

import pytest
import torch

from kernels import attention_jvp as kernel_module
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

    monkeypatch.setattr(kernel_module, "_empty", nan_empty)


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


@pytest.mark.parametrize("dtype,shape", KERNEL_CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_kernels_match_float64_reference(dtype, shape):
    """Fused forward and backward with gO and gT, gO only and gT only."""
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
    return torch.ops.tvm.attention_jvp_fwd(*inputs)[:2]


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
    torch.library.opcheck(torch.ops.tvm.attention_jvp_fwd.default, tuple(leaves))


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
