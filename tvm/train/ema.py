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

from tvm.train.sharding import ModuleT, local


def make_ema(net: ModuleT) -> ModuleT:
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
    ema_params = [local(p) for p in ema.parameters()]  # sharded (FSDP2) modules: this rank's slices
    net_params = [local(p) for p in net.parameters()]
    if len(ema_params) != len(net_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the network {len(net_params)}")
    # In place: ``ema.lerp_(net, 1 − β)`` gives ``ema + (1 − β)(net − ema)``, bit for bit upstream's
    # ``lerp(net, ema, β) = ema − (ema − net)(1 − β)`` (β ≥ 0.5 branch) when ``1 − β`` is formed in the
    # parameters' dtype as lerp forms it (exact there: Sterbenz), and saves a temporary copy of every
    # parameter and the copy back (tests/train/test_ema.py checks the bits for many β, both dtypes).
    dtype = ema_params[0].dtype
    if beta <= 0.5:  # 1 − β ≥ 0.5 would take lerp's other branch: no in-place form with upstream's rounding
        if skip is None:
            new = torch._foreach_lerp(net_params, ema_params, beta)
        else:
            weight = torch.where(skip, 1.0, beta).to(dtype)
            new = torch._foreach_lerp(net_params, ema_params, [weight] * len(ema_params))
        torch._foreach_copy_(ema_params, new)
        return
    if skip is None:
        complement = float(1 - torch.tensor(beta, dtype=dtype))  # on the CPU: no device sync
        torch._foreach_lerp_(ema_params, net_params, complement)
    else:
        weight = 1 - torch.where(skip, 1.0, beta).to(dtype)  # upstream's weight tensor, complemented
        torch._foreach_lerp_(ema_params, net_params, [weight] * len(ema_params))
