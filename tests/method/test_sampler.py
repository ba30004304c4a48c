"""Few-step sampler (docs/method.md §4, §12 item 29)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch

from helpers import one_hot, tiny_wrapper
from tvm.method.objective import flow_map
from tvm.method.sampler import sample, time_grid
from tvm.models.dit import FlowMapInput


@dataclass
class RecordingNet:
    do_scale_param: bool = True
    calls: list = field(default_factory=list)

    def velocity(self, inputs, attn_backend=None, out_dtype=torch.float32):
        x, t, gap, labels, beta = inputs
        self.calls.append(dict(x=x.clone(), t=t.clone(), gap=gap.clone(), labels=labels, beta=beta.clone()))
        return (0.5 * x + t).to(out_dtype)  # an affine field, so the steps can be checked by hand


@pytest.mark.parametrize("steps, grid", [(1, [1, 0]), (2, [1, 0.5, 0]), (4, [1, 0.75, 0.5, 0.25, 0])])
def test_time_grids(steps, grid):
    g = time_grid(steps)
    assert g.dtype == torch.float64 and g.tolist() == grid


@pytest.mark.parametrize("scale", [True, False])
def test_step_algebra(scale):
    net = RecordingNet(do_scale_param=scale)
    z = torch.randn(3, 2, 4, 4)
    out = sample(net, z, one_hot([1, 2, 3]).float(), steps=4, guidance=1.5)
    kappa = 1.5 if scale else 1.0
    x = z.double()
    grid = [1, 0.75, 0.5, 0.25, 0]
    for i, call in enumerate(net.calls):
        assert call["t"].tolist() == [grid[i]] and call["gap"].tolist() == [grid[i] - grid[i + 1]]
        torch.testing.assert_close(call["beta"], torch.full((3,), 1 / 1.5, dtype=torch.float64))
        x = x + (grid[i + 1] - grid[i]) * kappa * (0.5 * x + grid[i])
    assert len(net.calls) == 4 and out.dtype == torch.float64
    torch.testing.assert_close(out, x, rtol=1e-15, atol=1e-15)


def test_a_step_is_the_objectives_flow_map_in_the_samplers_operation_order():
    """Bit for bit, also where the grid steps are not powers of two (3 steps) and κ = w ≠ 1."""
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    out = sample(RecordingNet(), z, None, steps=3, guidance=1.75)
    grid = time_grid(3)
    x = y = z.double()
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        x = flow_map(x, 0.5 * x + t_cur, t_cur, t_next, 1.75)
        y = y + (t_next - t_cur) * 1.75 * (0.5 * y + t_cur)
    assert torch.equal(out, x) and torch.equal(out, y)


def test_sampling_a_real_network_unguided_and_unconditional():
    net = tiny_wrapper(dtype=torch.float32)
    z = torch.randn(4, 2, 8, 8)
    one = sample(net, z, one_hot([0, 1, 2, 3]).float(), steps=1, guidance=1.0)
    expected = z.double() - net.velocity(
        FlowMapInput(z, torch.ones(1), torch.ones(1), one_hot([0, 1, 2, 3]).float(), torch.ones(4)),
        out_dtype=torch.float64,
    )
    torch.testing.assert_close(one, expected)
    uncond = sample(net, z, None, steps=2, guidance=1.0)
    assert torch.isfinite(uncond).all() and not torch.equal(uncond, one)


def test_cfg_below_one_is_rejected():
    with pytest.raises(ValueError, match="guidance = 0.8 is not allowed"):
        sample(RecordingNet(), torch.randn(1, 2, 4, 4), steps=1, guidance=0.8)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sample(RecordingNet(), torch.randn(1, 2, 4, 4), steps=0)
