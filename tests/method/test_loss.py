"""The TVM objective (docs/method.md §1.4–1.6, §12 items 18–22)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch

from helpers import one_hot, tiny_wrapper, undropped_draws
from tvm.method.objective import apply_label_dropout, flow_matching_term, terminal_term, tvm_loss
from tvm.method.times import StepDraws
from tvm.models.dit import FlowMapInput

D64 = torch.float64


@dataclass
class OracleNet:
    """The exact average velocity of a single-point data distribution x0: F*(x, t, s) = (x − x0)/t.

    It does not depend on s, so ∂_s F* = 0; it records every call for inspection.
    """

    x0: torch.Tensor
    do_scale_param: bool = False
    detach_jvp: bool = False
    jvp_mode: str = "autograd"  # ∂_s F by torch.func.jvp through velocity()
    jvp_attn_backend: str = "math"
    calls: list = field(default_factory=list)

    def velocity(self, inputs, attn_backend=None, out_dtype=D64, *, recompute=True):
        x, t, gap, labels, beta = inputs
        self.calls.append(dict(x=x, t=t, gap=gap, labels=labels, beta=beta))
        return (x - self.x0) / t.view(-1, 1, 1, 1) + 0 * gap.view(-1, 1, 1, 1)


def oracle_inputs(n=5):
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, 2, 4, 4, generator=gen, dtype=D64)
    noise = torch.randn(n, 2, 4, 4, generator=gen, dtype=D64)
    t = 0.2 + 0.8 * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64)
    s = t * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64) * 0.9 + 0.05
    s_prime = 0.05 + 0.9 * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64)
    return x0, noise, t, s, s_prime


def test_oracle_average_velocity_has_zero_loss():
    x0, noise, t, s, s_prime = oracle_inputs()
    net, teacher = OracleNet(x0), OracleNet(x0)
    out = tvm_loss(
        net, teacher, x0.expand_as(noise), one_hot([0] * 5), undropped_draws(t, s, s_prime, torch.ones_like(t), noise)
    )
    assert out["terminal"].abs().max() < 1e-24 and out["fm"].abs().max() < 1e-24
    # The teacher is called once, with batch 2B: (f_ts, s, 0, c, β) then (x_{s'}, s', 0, null, 1).
    assert len(teacher.calls) == 1
    call = teacher.calls[0]
    assert call["x"].shape[0] == 10 and not call["x"].requires_grad
    torch.testing.assert_close(call["x"][:5], (1 - s) * x0 + s * noise)  # f_ts = x_s exactly for the oracle
    torch.testing.assert_close(call["t"], torch.cat([s, s_prime]))
    assert torch.count_nonzero(call["gap"]) == 0
    assert torch.equal(call["labels"][5:], torch.zeros(5, 10, dtype=D64))
    assert torch.equal(call["beta"][5:], torch.ones(5, 1, 1, 1, dtype=D64))


def reference_terms(net, teacher, x, noise, t, s, s_prime, labels, beta):
    """§12 item 21 written out independently with explicit finite-difference-free algebra."""
    w = 1 / beta
    k = w if net.do_scale_param else torch.ones_like(w)
    x_t, x_sp = (1 - t) * x + t * noise, (1 - s_prime) * x + s_prime * noise
    fn = lambda s_: net.velocity(FlowMapInput(x_t, t, t - s_, labels, beta), attn_backend="math", out_dtype=D64)  # noqa: E731
    F, dF = torch.func.jvp(fn, (s,), (torch.ones_like(s),))
    f_ts = x_t + (s - t) * k * F
    dfds = k * (F + (s - t) * dF)
    null = torch.zeros_like(labels)
    F_T1 = teacher.velocity(FlowMapInput(f_ts, s, torch.zeros_like(s), labels, beta), out_dtype=D64)
    F_T0 = teacher.velocity(
        FlowMapInput(x_sp, s_prime, torch.zeros_like(s), null, torch.ones_like(beta)), out_dtype=D64
    )
    F_on = net.velocity(FlowMapInput(x_sp, s_prime, torch.zeros_like(s), labels, beta), out_dtype=D64)
    term = (((dfds - k * F_T1) * beta) ** 2).mean(dim=(1, 2, 3))
    fm = (((k * F_on - (w * (noise - x) + (1 - w) * F_T0)) * beta) ** 2).mean(dim=(1, 2, 3))
    return term, fm


def test_objective_equals_the_written_out_formula():
    for scale in (True, False):
        net = tiny_wrapper(do_scale_param=scale)
        teacher = copy.deepcopy(tiny_wrapper(do_scale_param=scale, perturb=True)).eval()
        with torch.no_grad():  # make the teacher differ from the online net
            for p in teacher.parameters():
                p.mul_(1.1)
        gen = torch.Generator().manual_seed(1)
        x, noise = torch.randn(2, 4, 2, 8, 8, generator=gen, dtype=D64)
        t = 0.3 + 0.7 * torch.rand(4, 1, 1, 1, generator=gen, dtype=D64)
        s = t * torch.rand(4, 1, 1, 1, generator=gen, dtype=D64)
        s_prime = torch.rand(4, 1, 1, 1, generator=gen, dtype=D64)
        beta = torch.tensor([0.5, 0.5, 1.0, 0.25], dtype=D64).view(4, 1, 1, 1)
        labels = one_hot([1, 2, 3, 4])
        out = tvm_loss(net, teacher, x, labels, undropped_draws(t, s, s_prime, beta, noise))
        term, fm = reference_terms(net, teacher, x, noise, t, s, s_prime, labels, beta)
        torch.testing.assert_close(out["terminal"], term, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["fm"], fm, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(out["loss"], term + fm)
        assert term.min() > 0


def test_unit_guidance_makes_the_fm_target_the_conditional_velocity():
    x0, noise, t, s, s_prime = oracle_inputs()
    x = x0.expand_as(noise)

    class Zero(OracleNet):
        def velocity(self, inputs, attn_backend=None, out_dtype=D64, *, recompute=True):
            return torch.zeros_like(inputs.x)

    out = tvm_loss(Zero(x0), Zero(x0), x, None, undropped_draws(t, s, s_prime, torch.ones_like(t), noise))
    torch.testing.assert_close(out["fm"], ((noise - x) ** 2).mean(dim=(1, 2, 3)))


def test_label_dropout_nulls_labels_sets_beta_one_and_never_mutates_inputs():
    labels = one_hot([1, 2, 3])
    beta = torch.full((3, 1, 1, 1), 0.5, dtype=D64)
    drop = torch.tensor([False, True, False])
    new_labels, new_beta = apply_label_dropout(labels, beta, drop)
    assert torch.equal(new_labels[1], torch.zeros(10, dtype=D64)) and torch.equal(new_labels[0], labels[0])
    assert new_beta.flatten().tolist() == [0.5, 1.0, 0.5]
    assert torch.equal(labels, one_hot([1, 2, 3])) and beta.flatten().tolist() == [0.5] * 3


def test_s_equal_t_masks_the_terminal_term_and_nan_is_never_hidden():
    net = tiny_wrapper()
    teacher = copy.deepcopy(net).eval()
    gen = torch.Generator().manual_seed(2)
    x, noise = torch.randn(2, 3, 2, 8, 8, generator=gen, dtype=D64)
    t = torch.tensor([0.7, 0.5, 0.9], dtype=D64).view(3, 1, 1, 1)
    s = torch.tensor([0.7, 0.2, 0.1], dtype=D64).view(3, 1, 1, 1)
    beta = torch.full_like(t, 0.5)
    out = tvm_loss(net, teacher, x, one_hot([0, 1, 2]), undropped_draws(t, s, s.clone(), beta, noise))
    assert out["terminal"][0] == 0 and out["terminal"][1] > 0
    x = x.clone()
    x[2, 0, 0, 0] = float("nan")
    out = tvm_loss(net, teacher, x, one_hot([0, 1, 2]), undropped_draws(t, s, s.clone(), beta, noise))
    assert torch.isnan(out["loss"][2]) and torch.isfinite(out["loss"][:2]).all()


def test_wrapper_forward_applies_the_draws_label_dropout():
    net = tiny_wrapper()
    teacher = copy.deepcopy(net).eval()
    gen = torch.Generator().manual_seed(4)
    n = 3
    draws = StepDraws(
        t=torch.full((n, 1, 1, 1), 0.8, dtype=D64),
        s=torch.full((n, 1, 1, 1), 0.3, dtype=D64),
        s_prime=torch.full((n, 1, 1, 1), 0.4, dtype=D64),
        beta=torch.full((n, 1, 1, 1), 0.5, dtype=D64),
        noise=torch.randn(n, 2, 8, 8, generator=gen, dtype=D64),
        drop=torch.tensor([True, False, False]),
    )
    x, labels = torch.randn(n, 2, 8, 8, generator=gen, dtype=D64), one_hot([3, 4, 5])
    out = net(x, labels, draws, teacher)
    dropped_labels, dropped_beta = apply_label_dropout(labels, draws.beta, draws.drop)
    ref = tvm_loss(
        net, teacher, x, dropped_labels, undropped_draws(draws.t, draws.s, draws.s_prime, dropped_beta, draws.noise)
    )
    torch.testing.assert_close(out["loss"], ref["loss"])
    assert torch.equal(labels, one_hot([3, 4, 5]))


def test_the_two_terms_computed_apart_equal_the_whole_objective():
    """terminal_term + flow_matching_term (and the wrapper's phases) give tvm_loss's values bit for bit,
    with label dropout applied once for both terms."""
    net = tiny_wrapper()
    teacher = copy.deepcopy(tiny_wrapper(perturb=True)).eval()
    with torch.no_grad():
        for p in teacher.parameters():
            p.mul_(0.9)
    gen = torch.Generator().manual_seed(5)
    n = 4
    draws = StepDraws(
        t=0.3 + 0.7 * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64),
        s=0.2 * torch.rand(n, 1, 1, 1, generator=gen, dtype=D64),
        s_prime=torch.rand(n, 1, 1, 1, generator=gen, dtype=D64),
        beta=torch.tensor([0.5, 0.25, 1.0, 0.5], dtype=D64).view(n, 1, 1, 1),
        noise=torch.randn(n, 2, 8, 8, generator=gen, dtype=D64),
        drop=torch.tensor([False, True, False, False]),
    )
    x, labels = torch.randn(n, 2, 8, 8, generator=gen, dtype=D64), one_hot([1, 2, 3, 4])
    whole = net(x, labels, draws, teacher)
    apart = net(x, labels, draws, teacher, phase="terminal")
    target = apart["fm_target"]
    assert not any(v.requires_grad for v in (target.v_hat, target.w, target.beta, *target.inputs[:2]))
    assert torch.equal(target.inputs.labels[1], torch.zeros(10, dtype=D64)) and target.beta[1].item() == 1.0
    fm = net(target, phase="fm")["fm"]
    assert torch.equal(apart["terminal"], whole["terminal"]) and torch.equal(fm, whole["fm"])
    assert torch.equal(flow_matching_term(net, target), fm)
    assert torch.equal(terminal_term(net, teacher, x, labels, draws)[0], whole["terminal"])
    with pytest.raises(ValueError, match="unknown phase 'both'"):
        net(x, labels, draws, teacher, phase="both")
