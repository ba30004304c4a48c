"""Device-side training statistics (tvm/runtime/stats.py)."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from helpers import run_gloo_workers
from tvm.runtime.stats import StatsCollector, time_bins


def _expected_binned(values: np.ndarray, t: np.ndarray, bins: int = 4) -> dict[str, float]:
    clean = np.nan_to_num(values, nan=0.0, posinf=1e5, neginf=-1e5)
    index = np.floor(bins * np.minimum(t, 0.999)).astype(int)
    return {f"loss_q{k}": clean[index == k].mean() for k in range(bins) if (index == k).any()}


def test_time_bins_edges() -> None:
    t = torch.tensor([0.0, 0.2499, 0.25, 0.5, 0.7499, 0.75, 0.999, 1.0])
    assert time_bins(t).tolist() == [0, 0, 1, 2, 2, 3, 3, 3]


def test_binned_means_match_numpy() -> None:
    rng = np.random.default_rng(0)
    t = np.concatenate([rng.uniform(0, 1, 200), [0.0, 0.25, 0.5, 0.75, 1.0]])
    values = rng.normal(size=t.size).astype(np.float32)
    values[[3, 50]] = np.nan
    values[7], values[9] = np.inf, -np.inf
    collector = StatsCollector()
    half = t.size // 2
    collector.report_binned("loss", torch.from_numpy(values[:half]), torch.from_numpy(t[:half]))
    collector.report_binned("loss", torch.from_numpy(values[half:]), torch.from_numpy(t[half:]))
    means = collector.summarize()
    expected = _expected_binned(values.astype(np.float64), t)
    assert means.keys() == expected.keys()
    for name, value in expected.items():
        assert means[name] == pytest.approx(value, rel=1e-12, abs=1e-12)


def test_report_summarize_and_reset() -> None:
    collector = StatsCollector()
    collector.report("a", torch.tensor([1.0, 2.0]))
    collector.report("a", 3.0)
    collector.report("b", [float("nan"), 4.0])
    collector.report("c", torch.tensor([float("nan"), 1.0]), clean=False)
    collector.report_binned("q", torch.tensor([5.0]), torch.tensor([0.9]))
    assert collector.summarize_std()["a"] == pytest.approx((2.0, np.std([1.0, 2.0, 3.0])))
    assert collector.names() == []
    collector.report("a", torch.ones(2, 3))
    collector.report("b", [float("nan"), 4.0])
    collector.report("c", torch.tensor([float("nan"), 1.0]), clean=False)
    collector.report_binned("q", torch.tensor([5.0]), torch.tensor([0.9]))
    means = collector.summarize()
    assert means["a"] == 1.0 and means["b"] == 2.0 and np.isnan(means["c"])
    assert means["q_q3"] == 5.0 and "q_q0" not in means
    assert collector.summarize() == {}


def test_report_binned_checks_lengths() -> None:
    with pytest.raises(ValueError, match="3 values but 2 times"):
        StatsCollector().report_binned("x", torch.zeros(3), torch.zeros(2))


_WORKER = textwrap.dedent(
    """
    import json, torch
    from tvm.runtime import distributed as D
    from tvm.runtime.stats import StatsCollector
    ctx = D.init_distributed(device="cpu")
    collector = StatsCollector(ctx.device)
    gen = torch.Generator().manual_seed(0)
    values, t = torch.randn(64, generator=gen), torch.rand(64, generator=gen)
    rows = slice(32 * ctx.rank, 32 * (ctx.rank + 1))
    collector.report_binned("loss", values[rows], t[rows])
    collector.report("all", values[rows])
    if ctx.rank == 1:
        collector.report("only_rank1", torch.tensor([7.0, 9.0]))
    print("RESULT " + json.dumps(collector.summarize()), flush=True)
    D.cleanup()
    """
)


def test_two_process_summarize_matches_global_means() -> None:
    results = sorted(run_gloo_workers(_WORKER), key=lambda r: r.get("rank", 0))
    assert len(results) == 2 and results[0] == results[1]

    gen = torch.Generator().manual_seed(0)
    values, t = torch.randn(64, generator=gen), torch.rand(64, generator=gen)
    expected = _expected_binned(values.double().numpy(), t.double().numpy())
    expected.update(all=values.double().mean().item(), only_rank1=8.0)
    assert results[0].keys() == expected.keys()
    for name, value in expected.items():
        assert results[0][name] == pytest.approx(value, rel=1e-9, abs=1e-12)
