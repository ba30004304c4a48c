"""Exponential moving averages of the network: the eval EMA and the teacher (target) EMA.

Both are updated after every optimizer step, eval EMA first (docs/method.md §5.2 items 8–9, §12 item 26):

    p_ema ← lerp(p_net, p_ema, β) = p_net + β·(p_ema − p_net)

over parameters only (the DiT has no buffers), paired in ``parameters()`` order. ``lerp`` with
start = p_net and end = p_ema is upstream's operation, so the values match it bit for bit. When
the step was skipped (non-finite gradients) the weight becomes exactly 1, which leaves the EMA
untouched without a host sync.
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn


def make_ema(net: nn.Module) -> nn.Module:
    """An exact copy of ``net`` in eval mode without gradients."""
    return copy.deepcopy(net).eval().requires_grad_(False)


@torch.no_grad()
def update_ema_(ema: nn.Module, net: nn.Module, beta: float, skip: torch.Tensor | None = None) -> None:
    """``p_ema ← lerp(p_net, p_ema, β)`` for every parameter pair; no-op where ``skip`` is true.

    Args:
        ema, net: modules with parameters in the same order and shapes.
        beta: decay β ∈ [0, 1].
        skip: 0-dim bool tensor on the parameters' device, or None.
    """
    ema_params = list(ema.parameters())
    net_params = list(net.parameters())
    if len(ema_params) != len(net_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the network {len(net_params)}")
    if skip is None:
        new = torch._foreach_lerp(net_params, ema_params, beta)
    else:
        weight = torch.where(skip, 1.0, beta).to(ema_params[0].dtype)
        new = torch._foreach_lerp(net_params, ema_params, [weight] * len(ema_params))
    torch._foreach_copy_(ema_params, new)
