"""The flow map and d f/d s by forward-mode AD, in both JVP modes, against finite differences and
forward_ad (docs/method.md §1.3, §12 items 13–17)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.autograd.forward_ad as fwAD

from helpers import one_hot, tiny_wrapper
from tvm.method.objective import flow_map, flow_map_derivative, kappa, velocity_and_ds
from tvm.method.times import Guidance, TimeSampling, draw_step
from tvm.models.dit import FlowMapInput

D64 = torch.float64


def setup_batch(net, n=4, guidance=2.0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 2, 8, 8, generator=gen, dtype=D64)
    t = torch.rand(n, 1, 1, 1, generator=gen, dtype=D64) * 0.5 + 0.5
    s = t * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64)
    labels = one_hot(list(range(n)))
    beta = torch.full((n, 1, 1, 1), 1.0 / guidance, dtype=D64)
    return x, t, s, labels, beta


def velocity_fn(net, x, t, labels, beta):
    return lambda s_: net.velocity(FlowMapInput(x, t, t - s_, labels, beta), attn_backend="math", out_dtype=D64)


JVP_MODES = pytest.mark.parametrize("jvp_mode", ["autograd", "explicit"])


def jvp_net(jvp_mode, **kwargs):
    net = tiny_wrapper(**kwargs)
    net.jvp_mode = jvp_mode
    return net


@JVP_MODES
def test_ds_matches_central_finite_difference_in_float64(jvp_mode):
    net = jvp_net(jvp_mode)
    x, t, s, labels, beta = setup_batch(net)
    fn = velocity_fn(net, x, t, labels, beta)
    F, dF = velocity_and_ds(net, FlowMapInput(x, t, t - s, labels, beta))
    h = 1e-5
    fd = (fn(s + h) - fn(s - h)) / (2 * h)
    rel = (dF - fd).norm() / fd.norm()
    assert rel < 1e-7, rel
    assert fd.norm() > 1e-3  # the derivative is not trivially zero


@JVP_MODES
def test_ds_matches_torch_autograd_forward_ad_and_is_minus_d_gap(jvp_mode):
    net = jvp_net(jvp_mode)
    x, t, s, labels, beta = setup_batch(net)
    _, dF = velocity_and_ds(net, FlowMapInput(x, t, t - s, labels, beta))
    gap = (t - s).detach()
    with fwAD.dual_level():
        dual_gap = fwAD.make_dual(gap, torch.ones_like(gap))
        out = net.velocity(FlowMapInput(x, t, dual_gap, labels, beta), attn_backend="math", out_dtype=D64)
        d_gap = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(dF, -d_gap, rtol=1e-10, atol=1e-12)


@JVP_MODES
def test_jvp_in_fp32_agrees_with_finite_difference_to_bf16_class_tolerance(jvp_mode):
    net = jvp_net(jvp_mode, dtype=torch.float32)
    x, t, s, labels, beta = (v.float() for v in setup_batch(net))
    fn = lambda s_: net.velocity(FlowMapInput(x, t, t - s_, labels, beta), attn_backend="math")  # noqa: E731
    _, dF = velocity_and_ds(net, FlowMapInput(x, t, t - s, labels, beta))
    h = 1e-3
    fd = (fn(s + h) - fn(s - h)) / (2 * h)
    assert dF.dtype == torch.float32  # fp32 mode: nothing is cast to bf16
    assert (dF - fd).norm() / fd.norm() < 5e-3


def test_flow_map_and_derivative_formulas_with_and_without_scaling():
    for scale in (True, False):
        net = tiny_wrapper(do_scale_param=scale)
        x, t, s, labels, beta = setup_batch(net, guidance=2.0)
        fn = velocity_fn(net, x, t, labels, beta)
        k = kappa(beta, scale)
        F, dF = velocity_and_ds(net, FlowMapInput(x, t, t - s, labels, beta))
        f_ts, dfds = flow_map(x, F, t, s, k), flow_map_derivative(F, dF, t, s, k)
        w = 2.0 if scale else 1.0
        torch.testing.assert_close(f_ts, x + (s - t) * w * F)
        assert torch.equal(f_ts, x + ((s - t) * F) * k)  # upstream's operation order, bit for bit
        torch.testing.assert_close(dfds, w * (F + (s - t) * dF))
        # d f/d s is the derivative of the flow map itself (central difference on s).
        h = 1e-5
        fd = (flow_map(x, fn(s + h), t, s + h, k) - flow_map(x, fn(s - h), t, s - h, k)) / (2 * h)
        torch.testing.assert_close(dfds, fd, rtol=1e-6, atol=1e-8)


def test_t_equal_s_gives_the_instantaneous_velocity():
    net = tiny_wrapper()
    x, t, _, labels, beta = setup_batch(net)
    s, k = t.clone(), kappa(beta, True)
    F, dF = velocity_and_ds(net, FlowMapInput(x, t, t - s, labels, beta))
    f_ts, dfds = flow_map(x, F, t, s, k), flow_map_derivative(F, dF, t, s, k)
    torch.testing.assert_close(f_ts, x)
    F0 = net.velocity(FlowMapInput(x, t, torch.zeros_like(t), labels, beta), attn_backend="math", out_dtype=D64)
    torch.testing.assert_close(dfds, F0 / beta)


def test_gradients_flow_through_the_tangent_and_detach_jvp_changes_only_gradients():
    base = tiny_wrapper(dtype=torch.float64)
    teacher = copy.deepcopy(base).eval().requires_grad_(False)
    x = torch.randn(6, 2, 8, 8, dtype=D64)
    draws = draw_step(
        torch.Generator().manual_seed(3), 6, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0, label_dropout=0)
    )
    draws = draws.to("cpu")
    draws = type(draws)(*(v.double() if v.is_floating_point() else v for v in vars(draws).values()))
    grads, losses = {}, {}
    for detach in (False, True):
        net = copy.deepcopy(base)
        net.detach_jvp = detach
        out = net(x, one_hot(range(6)), draws, teacher)
        out["loss"].sum().backward()
        losses[detach] = out["loss"].detach()
        grads[detach] = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
    torch.testing.assert_close(losses[True], losses[False], rtol=0, atol=0)
    assert (grads[True] - grads[False]).norm() > 1e-6 * grads[False].norm()
