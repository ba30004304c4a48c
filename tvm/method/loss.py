"""Per-sample TVM loss terms: paper Eq. 12, 14, 15 (docs/method.md §1.4–1.6, eq. M5–M8; §12 items 18–22).

With ``w = 1/β`` and ``κ = w`` under the scaled parametrisation (else 1):

1. ``x_t = (1 − t)x + tε``, ``x_{s'} = (1 − s')x + s'ε``, ``v = ε − x``;
2. online net with JVP at ``(x_t, t, s, c, β)`` → ``f_ts`` and ``d f/d s`` (:mod:`tvm.method.jvp`);
3. teacher (target EMA), no grad, one call of batch 2B:
   ``(f_ts, s, gap 0, c, β) → F_T1`` and ``(x_{s'}, s', gap 0, null, 1) → F_T0``;
4. online net, plain forward at ``(x_{s'}, s', gap 0, c, β)`` → ``F_on``;
5. terminal term ``mean_{CHW}(((d f/d s − κ F_T1)·β)²)`` (paper Eq. 12), zeroed (NaN-preserving) where s ≈ t;
6. FM target ``v̂ = w v + (1 − w) F_T0`` (paper Eq. 14; unscaled w, F_T0 never scaled), FM term
   ``mean_{CHW}(((κ F_on − v̂)·β)²)``; the loss is the sum of both terms (paper Eq. 15).

The factor β inside the square is the paper's 1/w² weighting. Non-finite values are returned
as they are: the training loop counts them and applies its policy (upstream zeroed NaN losses
silently, docs/method.md §11 item 7).
"""
from __future__ import annotations

from typing import Protocol

import torch

from tvm.method.jvp import df_ds


class VelocityNet(Protocol):
    """What :func:`loss_terms` needs from the online network and the teacher."""

    do_scale_param: bool
    detach_jvp: bool

    def velocity(self, x: torch.Tensor, t: torch.Tensor, gap: torch.Tensor, labels: torch.Tensor | None,
                 beta: torch.Tensor | None, attn_backend: str | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor: ...

    def velocity_and_ds(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None,
                        beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]: ...


def kappa(beta: torch.Tensor, do_scale_param: bool) -> torch.Tensor | float:
    """κ = 1/β computed in fp32 from the fp32 β tensor when scaling, else 1 (docs/method.md §1.2)."""
    return 1.0 / beta if do_scale_param else 1.0


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x + t·ε`` (docs/method.md §1.1): t = 0 is data, t = 1 pure noise."""
    return (1 - t) * x + t * noise


def mean_chw(v: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: ``[B, ...] → [B]``."""
    return v.flatten(1).mean(dim=1)


def loss_terms(net: VelocityNet, teacher: VelocityNet, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
               s: torch.Tensor, s_prime: torch.Tensor, labels: torch.Tensor | None, beta: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """Per-sample terminal-velocity and flow-matching terms with pinned randomness.

    Args:
        net: the online network (gradients flow through it).
        teacher: the target-EMA network (called without gradient).
        x: data ``[B, C, R, R]`` (fp32); noise ε of the same shape.
        t, s, s_prime, beta: ``[B, 1, 1, 1]`` fp32 with ``0 ≤ s ≤ t ≤ 1``; β after label dropout.
        labels: one-hot ``[B, K]`` after label dropout (zero rows = null class), or None.
    Returns:
        ``{"terminal": [B], "fm": [B], "loss": [B]}`` (loss = terminal + fm).
    """
    k = kappa(beta, net.do_scale_param)
    w = 1.0 / beta
    zero_gap = torch.zeros_like(t)
    x_t = interpolate(x, noise, t)
    x_sp = interpolate(x, noise, s_prime)

    f_ts, dfds = df_ds(lambda s_: net.velocity_and_ds(x_t, t, s_, labels, beta), x_t, t, s, k,
                       detach_tangent=net.detach_jvp)

    with torch.no_grad():
        null = None if labels is None else torch.zeros_like(labels)
        F_T = teacher.velocity(
            torch.cat([f_ts.detach(), x_sp]), torch.cat([s, s_prime]), torch.cat([zero_gap, zero_gap]),
            None if labels is None else torch.cat([labels, null]), torch.cat([beta, torch.ones_like(beta)]))
        F_T1, F_T0 = F_T.chunk(2)

    F_on = net.velocity(x_sp, s_prime, zero_gap, labels, beta)
    if net.do_scale_param:
        F_T1 = F_T1 * w
        F_on = F_on * w

    terminal = mean_chw(((dfds - F_T1) * beta) ** 2)
    terminal = torch.where(torch.isclose(s, t).flatten(), terminal * 0, terminal)
    v_hat = w * (noise - x) + (1 - w) * F_T0
    fm = mean_chw(((F_on - v_hat) * beta) ** 2)
    return {"terminal": terminal, "fm": fm, "loss": terminal + fm}
