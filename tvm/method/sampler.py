"""Few-step sampling with the learned flow map (docs/method.md §4, eq. M12; §12 item 29).

Time grid ``linspace(1, 0, n + 1)`` in float64, float64 state, and per step the flow map from
t_i to t_{i+1} (:func:`tvm.method.objective.flow_map`, the loss's function)

    x ← x + ((t_{i+1} − t_i)·κ)·F(x, t_i, t_i − t_{i+1}, c, β),   β = 1/w, κ = w if scaled else 1.

Guidance is distilled into the β-conditioned network: one call per step, any w ≥ 1 (w = 1 is
unguided), and the sampling w may differ from the training w. ``labels=None`` (or all-zero
rows) samples the null class, i.e. unconditionally.
"""

from __future__ import annotations

import torch

from tvm.method.objective import flow_map
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import FlowMapInput


def time_grid(steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """``[steps + 1]`` float64 grid from 1 (noise) to 0 (data)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64, device=device)


@torch.no_grad()
def sample(
    net: TVMWrapper, z: torch.Tensor, labels: torch.Tensor | None = None, steps: int = 1, guidance: float = 1.0
) -> torch.Tensor:
    """Map noise ``z`` ``[N, C, R, R]`` to samples in ``steps`` network calls; returns float64.

    Args:
        net: the (EMA) network.
        z: standard normal noise.
        labels: one-hot ``[N, K]`` (zero rows = null class), or None for all-null.
        steps: number of network evaluations (1, 2, 4 in the configs; any ≥ 1).
        guidance: guidance scale w ≥ 1 (the configs' ``cfg_scale``).
    """
    if not guidance >= 1.0:
        raise ValueError(f"guidance = {guidance} is not allowed: the guidance scale must be >= 1 (1 = unguided)")
    grid = time_grid(steps, z.device)
    x = z.to(torch.float64)
    beta = torch.full((x.shape[0],), 1.0 / guidance, dtype=torch.float64, device=z.device)
    kappa = guidance if net.do_scale_param else 1.0
    for t_cur, t_next in zip(grid[:-1], grid[1:]):
        inputs = FlowMapInput(x, t_cur.reshape(1), (t_cur - t_next).reshape(1), labels, beta)
        F = net.velocity(inputs, out_dtype=torch.float64)
        x = flow_map(x, F, t_cur, t_next, kappa)
    return x
