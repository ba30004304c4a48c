"""Explicit tangent propagation (tvm/models/tangent.py, DiT.forward_with_tangent) against
``torch.func.jvp`` of the plain forward, in float64, and the loss in both JVP modes."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from helpers import one_hot, perturb_, tiny_dit, tiny_wrapper, undropped_draws
from kernels.reference import attention_jvp_math, attention_tangent_math
from tvm.method.objective import tvm_loss
from tvm.models import dit as dit_module
from tvm.models import tangent
from tvm.models.dit import FlowMapInput

D64 = torch.float64


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D64)


def assert_jvp(rule, fn, *primals):
    """``rule(x, ẋ)`` equals ``torch.func.jvp(fn, x, ẋ)`` (value and tangent) in float64."""
    tangents = tuple(randn(*p.shape, seed=10 + i) for i, p in enumerate(primals))
    ref_y, ref_dy = torch.func.jvp(fn, primals, tangents)
    y, dy = rule(primals, tangents)
    torch.testing.assert_close(y, ref_y, rtol=0, atol=0)
    torch.testing.assert_close(dy, ref_dy, rtol=1e-12, atol=1e-13)
    assert ref_dy.abs().max() > 1e-3


def test_elementwise_and_norm_rules_match_forward_mode_autodiff():
    x = randn(3, 5, 16) * 2
    w, b = randn(7, 16, seed=1), randn(7, seed=2)
    gamma = randn(16, seed=3)
    assert_jvp(lambda p, t: tangent.linear(p[0], t[0], w, b), lambda a: F.linear(a, w, b), x)
    assert_jvp(lambda p, t: tangent.silu(p[0], t[0]), F.silu, x)
    assert_jvp(lambda p, t: tangent.gelu_tanh(p[0], t[0]), lambda a: F.gelu(a, approximate="tanh"), x)
    assert_jvp(lambda p, t: tangent.rms_norm(p[0], t[0], 1e-6), lambda a: F.rms_norm(a, (16,), eps=1e-6), x)
    assert_jvp(
        lambda p, t: tangent.rms_norm(p[0], t[0], 1e-6, gamma), lambda a: F.rms_norm(a, (16,), gamma, eps=1e-6), x
    )
    assert_jvp(lambda p, t: tangent.rms_normalize(p[0], t[0], 1e-6), dit_module.rms_normalize, x)
    shift, scale = randn(3, 16, seed=4), randn(3, 16, seed=5)
    assert_jvp(
        lambda p, t: tangent.modulate(p[0], t[0], (p[1], t[1]), (p[2], t[2])), dit_module.modulate, x, shift, scale
    )
    gate, branch = randn(3, 16, seed=6), randn(3, 5, 16, seed=7)
    assert_jvp(
        lambda p, t: tangent.gated_residual(p[0], t[0], (p[1], t[1]), (p[2], t[2])),
        lambda a, g, br: a + g[:, None] * br,
        x,
        gate,
        branch,
    )


def test_dropout_uses_one_mask_for_value_and_tangent():
    x, dx = randn(4, 64) + 3, randn(4, 64, seed=1)
    torch.manual_seed(0)
    y, dy = tangent.dropout(x, dx, 0.5, training=True)
    kept = y != 0
    assert 0 < kept.sum() < x.numel()
    torch.testing.assert_close(y[kept], 2 * x[kept])
    torch.testing.assert_close(dy[kept], 2 * dx[kept])
    assert torch.count_nonzero(dy[~kept]) == 0
    assert tangent.dropout(x, dx, 0.5, training=False) == (x, dx)


def test_timestep_feature_derivative_matches_forward_mode_autodiff():
    tau = torch.rand(6, dtype=D64)
    for dim in (256, 9):
        _, ref = torch.func.jvp(lambda a: dit_module.timestep_features(a, dim), (tau,), (torch.ones_like(tau),))
        torch.testing.assert_close(dit_module.timestep_features_derivative(tau, dim), ref, rtol=1e-12, atol=1e-12)


def test_attention_tangent_formula_matches_jvp_of_math_attention():
    q, k, v, tq, tk, tv = (randn(2, 3, 7, 8, seed=i) for i in range(6))
    o, t = attention_tangent_math(q, k, v, tq, tk, tv)
    ref_o, ref_t = attention_jvp_math(q, k, v, tq, tk, tv)
    torch.testing.assert_close(o, ref_o, rtol=0, atol=0)
    torch.testing.assert_close(t, ref_t, rtol=1e-12, atol=1e-12)


def model_inputs(n=4, num_classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=D64)
    t = 0.5 + 0.5 * torch.rand(n, generator=gen, dtype=D64)
    gap = t * torch.rand(n, generator=gen, dtype=D64)
    labels = one_hot([i % max(num_classes, 1) for i in range(n)], num_classes) if num_classes else None
    beta = torch.full((n,), 0.4, dtype=D64)
    return x, t, gap, labels, beta


ARCHITECTURES = {
    "default": {},
    "no_qk_norm_no_mod_norm": dict(qk_norm=False, mod_norm=False),
    "no_guidance_embedder": dict(learn_guidance=False),
    "unconditional": dict(num_classes=0),
}


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_dit_forward_with_tangent_equals_func_jvp_along_the_gap(arch):
    kwargs = ARCHITECTURES[arch]
    torch.manual_seed(0)
    model = perturb_(tiny_dit(**kwargs)).to(D64)
    x, t, gap, labels, beta = model_inputs(num_classes=model.num_classes)
    dgap = randn(4, seed=3)
    inputs = FlowMapInput(x, t, gap, labels, beta)
    ref_F, ref_dF = torch.func.jvp(lambda g: model(x, t, g, labels, beta, attn_backend="math"), (gap,), (dgap,))
    out, dout = model.forward_with_tangent(inputs, dgap, attn_backend="math")
    assert torch.equal(out, model(x, t, gap, labels, beta, attn_backend="math"))  # same ops, same value
    torch.testing.assert_close(out, ref_F, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dout, ref_dF, rtol=1e-10, atol=1e-12)
    assert ref_dF.abs().max() > 1e-3


def test_gradients_through_value_and_tangent_equal_func_jvp():
    torch.manual_seed(0)
    model = perturb_(tiny_dit()).to(D64)
    ref_model = copy.deepcopy(model)
    x, t, gap, labels, beta = model_inputs()
    dgap = -torch.ones_like(gap)
    a, b = randn(4, 2, 8, 8, seed=5), randn(4, 2, 8, 8, seed=6)
    inputs = FlowMapInput(x, t, gap, labels, beta)
    out, dout = model.forward_with_tangent(inputs, dgap)
    ((a * out).sum() + (b * dout).sum()).backward()
    ref, dref = torch.func.jvp(lambda g: ref_model(x, t, g, labels, beta, attn_backend="math"), (gap,), (dgap,))
    ((a * ref).sum() + (b * dref).sum()).backward()
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, p_ref.grad, rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.parametrize("dtype,tol", [(D64, 1e-12), (torch.float32, 2e-5)])
def test_loss_and_gradients_equal_in_both_jvp_modes(dtype, tol):
    nets = {mode: tiny_wrapper(dtype=dtype) for mode in ("explicit", "autograd")}
    for mode, net in nets.items():
        net.jvp_mode = mode
    teacher = copy.deepcopy(nets["autograd"]).eval()
    x, t, gap, labels, beta = model_inputs()
    gen = torch.Generator().manual_seed(1)
    noise, s_prime = torch.randn(x.shape, generator=gen, dtype=D64), torch.rand(4, generator=gen, dtype=D64)
    col = lambda v: v.view(-1, 1, 1, 1).to(dtype)  # noqa: E731
    results = {}
    for mode, net in nets.items():
        out = tvm_loss(
            net,
            teacher,
            x.to(dtype),
            labels.to(dtype),
            undropped_draws(col(t), col(t - gap), col(s_prime), col(beta), noise.to(dtype)),
        )
        out["loss"].sum().backward()
        grads = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        results[mode] = out["loss"].detach(), grads
    (l_e, g_e), (l_a, g_a) = results["explicit"], results["autograd"]
    assert l_e.dtype == dtype
    assert (l_e - l_a).norm() / l_a.norm() < tol
    assert (g_e - g_a).norm() / g_a.norm() < tol


def test_triton_backend_in_the_interpreter_matches_math_in_fp32():
    torch.manual_seed(0)
    model = perturb_(tiny_dit(hidden=64, heads=4))  # head dim 16, 16 tokens
    x, t, gap, labels, beta = (v.float() if v is not None else None for v in model_inputs())
    dgap = -torch.ones_like(gap)
    inputs = FlowMapInput(x, t, gap, labels, beta)
    out_m, dout_m = model.forward_with_tangent(inputs, dgap, attn_backend="math")
    out_t, dout_t = model.forward_with_tangent(inputs, dgap, attn_backend="triton")
    torch.testing.assert_close(out_t, out_m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dout_t, dout_m, rtol=1e-5, atol=1e-6)


def test_sdpa_backend_is_refused_for_tangents():
    model = tiny_dit()
    x, t, gap, labels, beta = (v.float() for v in model_inputs())
    with pytest.raises(ValueError, match="computes no tangent"):
        model.forward_with_tangent(FlowMapInput(x, t, gap, labels, beta), -torch.ones_like(gap), attn_backend="sdpa")


def test_contiguous_kernel_operands_remove_the_launchers_copies_and_keep_the_bits(monkeypatch):
    """``contiguous_kernel_operands``: the Triton path's v and v̇ (views of the fused qkv output) are made
    contiguous before the kernel, so its launchers copy no input in the forward or the backward (without
    it: v and v̇ in both, docs/benchmarks.md Round 10); the values and gradients are the same bits. The
    upstream gradients gO, gT come back through the heads' merge in the outputs' token-major layout and
    are never copied."""
    from kernels import attention_jvp
    from tvm.models.attention import contiguous_kernel_operands

    shared_layout, in_output_layout, copied, gradients_copied = (
        attention_jvp._shared_layout,
        attention_jvp._in_output_layout,
        [],
        [],
    )

    def recording(*tensors):
        out = shared_layout(*tensors)
        copied.extend(i for i, (a, b) in enumerate(zip(tensors, out)) if a is not b)
        return out

    def recording_outputs(x, dtype, token_major_order):
        out = in_output_layout(x, dtype, token_major_order)
        gradients_copied.append(out is not x)
        return out

    monkeypatch.setattr(attention_jvp, "_shared_layout", recording)
    monkeypatch.setattr(attention_jvp, "_in_output_layout", recording_outputs)
    torch.manual_seed(0)
    model = perturb_(tiny_dit(hidden=64, heads=4))
    x, t, gap, labels, beta = (v.float() if v is not None else None for v in model_inputs())
    inputs = FlowMapInput(x, t, gap, labels, beta)
    results = {}
    for contiguous in (False, True):
        copied.clear()
        model.zero_grad(set_to_none=True)
        with contiguous_kernel_operands(contiguous):
            out, dout = model.forward_with_tangent(inputs, -torch.ones_like(gap), attn_backend="triton")
            (out.square().sum() + dout.square().sum()).backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results[contiguous] = out, dout, grads, sorted(set(copied)), len(copied)
    views, contiguous = results[False], results[True]
    assert views[3] == [2, 5] and views[4] == 2 * 2 * len(model.blocks)  # v, v̇: forward and backward, per block
    assert contiguous[3] == [] and contiguous[4] == 0
    assert len(gradients_copied) == 2 * 4 * len(model.blocks) and not any(gradients_copied)  # O, gO, T, gT
    for a, b in zip(views[:3], contiguous[:3]):
        torch.testing.assert_close(b, a, rtol=0, atol=0)
