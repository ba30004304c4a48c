"""The flow map f_{t→s} and its derivative d f/d s (docs/method.md §1.2–1.3).

``f(x_t, t, s) = x_t + (s − t)·κ·F(x_t, t, t − s)`` is a *position* (the state reached at time
s). Its derivative in the terminal time s is

    d f/d s = κ·[F + (s − t)·∂_s F],

where ``∂_s F`` comes from one forward-mode JVP with tangent 1 on s (x and t are constants: their
tangents are 0 upstream, so they are simply closed over here, which gives the same numbers
without propagating zero tangents). Inside the network the gap ``t − s`` then carries tangent
−1, so ``∂_s F = −∂F/∂gap``.

Two implementations give ``(F, ∂_s F)``: :func:`velocity_and_ds` here, ``torch.func.jvp`` through
the plain forward (the reference, upstream's method), and explicit tangent propagation
(``DiT.forward_with_tangent``, selected by ``TVMWrapper(jvp_mode="explicit")``). :func:`df_ds`
turns either into the flow map and its derivative.
"""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor], torch.Tensor]
VelocityAndDs = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def flow_map(x: torch.Tensor, F: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
             kappa: torch.Tensor | float) -> torch.Tensor:
    """``f = x + ((s − t)·F)·κ`` in upstream's operation order (docs/method.md eq. M3). Shapes broadcast."""
    return x + ((s - t) * F) * kappa


def flow_map_derivative(F: torch.Tensor, dF_ds: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                        kappa: torch.Tensor | float) -> torch.Tensor:
    """``d f/d s = κ·(F + (s − t)·∂_s F)`` (docs/method.md eq. M4, §12 item 13)."""
    return kappa * (F + (s - t) * dF_ds)


def velocity_and_ds(velocity_of_s: Velocity, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(s), ∂_s F(s))`` by ``torch.func.jvp`` with tangent 1 on s.

    Args:
        velocity_of_s: ``s ↦ F(x, t, t − s, c, β)`` with x, t, c, β closed over.
        s: ``[B, 1, 1, 1]``.
    Gradients flow through both outputs (second-order autodiff through forward-mode AD).
    """
    return torch.func.jvp(velocity_of_s, (s,), (torch.ones_like(s),))


def df_ds(velocity_and_ds_of_s: VelocityAndDs, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
          kappa: torch.Tensor | float, detach_tangent: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(f_{t→s}(x), d f/d s)`` for a batch (docs/method.md §1.3).

    Args:
        velocity_and_ds_of_s: ``s ↦ (F, ∂_s F)`` (e.g. ``lambda s: velocity_and_ds(fn, s)``).
        x: ``[B, C, R, R]``; t, s: ``[B, 1, 1, 1]``; kappa: ``[B, 1, 1, 1]`` or a float.
        detach_tangent: the paper's "detach JVP" variant: stop the gradient through ∂_s F only.
    Returns:
        ``f_ts`` and ``dfds``, both ``[B, C, R, R]``.
    """
    F, dF_ds = velocity_and_ds_of_s(s)
    if detach_tangent:
        dF_ds = dF_ds.detach()
    return flow_map(x, F, t, s, kappa), flow_map_derivative(F, dF_ds, t, s, kappa)
