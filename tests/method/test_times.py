"""Time, CFG and label-dropout sampling (docs/method.md §2, §12 items 23–24)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from tvm.method.times import Guidance, TimeSampling, draw_step, logit, sample_beta, sample_times

N = 200_000


def logits(v: torch.Tensor) -> np.ndarray:
    return logit(v.double().clamp(1e-12, 1 - 1e-12)).flatten().numpy()


def test_gap_sampler_marginals_and_ordering():
    gen = torch.Generator().manual_seed(0)
    t, s, s_prime = sample_times(gen, N, TimeSampling())
    assert t.shape == (N, 1, 1, 1) and t.dtype == torch.float32
    assert (s >= 0).all() and (s <= t).all() and (t <= 1).all()
    g = (t - s)[t < 1]
    # logit(g) ~ N(−0.8, 1) where t is not clamped (clamping removes a small right tail of g).
    gap = torch.sigmoid(torch.logit(g.double()))
    assert stats.kstest(logits(s_prime), "norm", args=(-0.4, 1.0)).pvalue > 1e-3
    assert abs(float(torch.logit(gap).mean()) - (-0.8)) < 0.1
    # logit(s) is N(−0.4, 1) truncated above at logit(1 − g): check the conditional CDF identity.
    g_all = t - s
    upper = logits(1 - g_all)
    u = stats.norm.cdf(logits(s), -0.4, 1.0) / stats.norm.cdf(upper, -0.4, 1.0)
    unclamped = (t < 1).flatten().numpy()
    assert stats.kstest(u[unclamped & (u < 1 - 1e-6)], "uniform").pvalue > 1e-4
    assert (logits(s) <= upper + 1e-4).all()


def test_gap_exactly_sigmoid_of_the_normal_draw():
    gen = torch.Generator().manual_seed(5)
    t, s, _ = sample_times(gen, 4096, TimeSampling(fm_time="shared"))
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(4096, 1, 1, 1, generator=gen)
    g = torch.sigmoid(z * 1.0 - 0.8)
    keep = t < 1
    torch.testing.assert_close((t - s)[keep], g[keep], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("scheme", ["trunc", "clamp"])
def test_ablation_schemes_keep_s_below_t(scheme):
    t, s, s_prime = sample_times(
        torch.Generator().manual_seed(1), 10_000, TimeSampling(scheme=scheme, fm_time="shared")
    )
    assert (s <= t).all() and (t <= 1).all() and (s >= 0).all()
    assert torch.equal(s, s_prime)
    if scheme == "clamp":
        assert (s == t).float().mean() > 0.05  # clamping puts mass on s = t
    else:
        assert stats.kstest(logits(t), "norm", args=(1.0, 1.0)).pvalue > 1e-3


def test_fraction_t_equal_s():
    t, s, _ = sample_times(torch.Generator().manual_seed(2), 20_000, TimeSampling(frac_t_eq_s=0.2))
    assert abs((s == t).float().mean().item() - 0.2) < 0.02


def test_cfg_modes():
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(sample_beta(gen, 5, Guidance(cfg=2.0)), torch.full((5, 1, 1, 1), 0.5))
    w = 1 / sample_beta(gen, N, Guidance(min_cfg=1.5, max_cfg=3.0)).double()
    assert w.min() >= 1.5 - 1e-5 and w.max() <= 3.0 + 1e-5
    assert stats.kstest(w.flatten().numpy(), "uniform", args=(1.5, 1.5)).pvalue > 1e-3
    beta = sample_beta(gen, N, Guidance(min_cfg=1.5, max_cfg=3.0, cfg_range_mode="beta")).double()
    assert stats.kstest(beta.flatten().numpy(), "uniform", args=(1 / 3, 1 / 1.5 - 1 / 3)).pvalue > 1e-3
    beta = sample_beta(gen, N, Guidance()).double()
    assert stats.kstest(beta.flatten().numpy(), "uniform").pvalue > 1e-3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(cfg=0.5), "cfg = 0.5 is not allowed: CFG scales must be >= 1"),
        (dict(min_cfg=0.9, max_cfg=2.0), "min_cfg = 0.9 is not allowed"),
        (dict(min_cfg=1.5), "must be given together"),
        (dict(min_cfg=3.0, max_cfg=2.0), "exceeds max_cfg"),
        (dict(label_dropout=1.5), "label_dropout must lie in"),
    ],
)
def test_guidance_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Guidance(**kwargs)


def test_time_sampling_validation():
    with pytest.raises(ValueError, match="unknown time scheme 'uniform'"):
        TimeSampling(scheme="uniform")
    with pytest.raises(ValueError, match="gap_P_std must be positive"):
        TimeSampling(gap_P_std=0)


def test_global_draws_are_a_function_of_the_generator_seed():
    """Each rank draws the global batch from the same seed and takes its rows (tests/runtime/test_distributed.py)."""
    args = (64, (2, 4, 4), TimeSampling(), Guidance(cfg=2.0))
    full = draw_step(torch.Generator().manual_seed(9), *args)
    again = draw_step(torch.Generator().manual_seed(9), *args)
    assert torch.equal(full.noise, again.noise) and torch.equal(full.t, again.t) and torch.equal(full.drop, again.drop)
    assert full.drop.dtype == torch.bool and abs(full.drop.float().mean().item() - 0.1) < 0.1
