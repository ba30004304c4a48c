"""The TVM training objective, in the order of the paper's equations.

One step of the objective for a batch, given the step's draws (:class:`~tvm.method.times.StepDraws`:
times ``0 ≤ s ≤ t ≤ 1``, the flow-matching time ``s'``, ``β = 1/w``, noise ``ε``, label-dropout flags):

1. **Label dropout.** A dropped row becomes the null class (all-zero one-hot) and its ``β`` becomes
   1 (``w = 1``, unguided), before any network call (:func:`apply_label_dropout`).
2. **Interpolation.** ``x_t = (1 − t)·x + t·ε`` and ``x_{s'}`` likewise; the conditional velocity
   is ``v = ε − x`` (t = 0 is data, t = 1 is noise; :func:`interpolate`).
3. **Flow map.** ``f_θ(x_t, t, s) = x_t + (s − t)·κ·F_θ(x_t, t, t − s, c, β)``, a position, with
   ``κ = w`` under the scaled parametrisation and 1 otherwise (:func:`kappa`, :func:`flow_map`).
   The sampler takes its steps with the same function.
4. **Its derivative in the terminal time.** ``d f/d s = κ·(F + (s − t)·∂_s F)``
   (:func:`flow_map_derivative`), with ``∂_s F`` from one forward-mode JVP in s (tangent 1 on s,
   so −1 on the gap input), in either mode (:func:`velocity_and_ds`).
5. **Teacher.** The target EMA, without gradient, in one call of batch 2B: ``u(f_ts, s, c, w)``
   (the velocity at the flow map's end point) and ``u(x_{s'}, s', ∅, 1)`` (unconditional).
6. **Terminal-velocity term** (paper Eq. 12): ``‖d f/d s − u_sg(f_ts, s, c, w)‖²``, zeroed where
   ``s = t``.
7. **Guided flow-matching target** (paper Eq. 14): ``v̂ = w·v + (1 − w)·u_sg(x_{s'}, s', ∅, 1)``,
   and the term ``‖u_θ(x_{s'}, s', c, w) − v̂‖²``.
8. **Total** (paper Eq. 15): both terms weighted by ``1/w²``, written as the factor ``β`` inside
   the square; squared errors are averaged (not summed) over C·H·W, as upstream.

Every operation is in upstream's order, so fp32 results agree with it bit for bit:
``f = x + ((s − t)·F)·κ``, ``d f/d s = κ·(F + (s − t)·∂_s F)``, ``κ = 1/β`` in fp32 from the fp32 β.
Non-finite values are returned as they are: the training loop counts them and applies its policy
(upstream zeroed NaN losses silently).

Steps 1–6 are :func:`terminal_term` and step 7's term :func:`flow_matching_term`, so that a step can
run the backward of each term on its own (``training.split_backward``: the activations of the two
online-network passes are then never held together); :func:`tvm_loss` is both.

The network (:class:`~tvm.method.wrapper.TVMWrapper`) holds the weights and the precision; its
``forward`` is :func:`tvm_loss` (or one term, by ``phase``), so that under DDP the objective runs inside
the wrapped forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import torch

from tvm.method.times import StepDraws
from tvm.models.dit import FlowMapInput

if TYPE_CHECKING:  # the wrapper imports this module; the objective needs its velocity methods
    from tvm.method.wrapper import TVMWrapper


# 1. Label dropout ---------------------------------------------------------------------------------


def apply_label_dropout(
    labels: torch.Tensor | None, beta: torch.Tensor, drop: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Dropped rows → all-zero labels (null class) and β = 1. Never in place.

    Args:
        labels: one-hot ``[B, K]`` or None; beta: ``[B, 1, 1, 1]``; drop: ``[B]`` bool.
    """
    beta = torch.where(drop.view(-1, 1, 1, 1), torch.ones_like(beta), beta)
    if labels is not None:
        labels = labels * (~drop).to(labels.dtype)[:, None]
    return labels, beta


# 2. Interpolation ---------------------------------------------------------------------------------


def interpolate(x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 − t)·x + t·ε``: t = 0 is data, t = 1 pure noise."""
    return (1 - t) * x + t * noise


# 3. The flow map ----------------------------------------------------------------------------------


def kappa(beta: torch.Tensor, do_scale_param: bool) -> torch.Tensor | float:
    """κ = w = 1/β, computed in fp32 from the fp32 β tensor, under the scaled parametrisation; else 1."""
    return 1.0 / beta if do_scale_param else 1.0


def flow_map(
    x: torch.Tensor, F: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kappa: torch.Tensor | float
) -> torch.Tensor:
    """``f_{t→s}(x) = x + (s − t)·κ·F``: the state reached at time s from x at time t.

    Used by the loss (t, s, κ ``[B, 1, 1, 1]`` fp32: ``x + ((s − t)·F)·κ``, upstream's order) and
    by the sampler's steps (0-dim float64 times). A κ given as a Python number (the sampler's w,
    or 1 without the scaled parametrisation) is folded into the time step first,
    ``x + ((s − t)·κ)·F``: one scalar product instead of one per element, and the sampler's order
    (the two orders differ in the last bit; with κ = 1 they are the same). Shapes broadcast.
    """
    if isinstance(kappa, (int, float)):
        return x + ((s - t) * kappa) * F
    return x + ((s - t) * F) * kappa


# 4. Its derivative in the terminal time -----------------------------------------------------------


def flow_map_derivative(
    F: torch.Tensor, dF_ds: torch.Tensor, t: torch.Tensor, s: torch.Tensor, kappa: torch.Tensor | float
) -> torch.Tensor:
    """``d f/d s = κ·(F + (s − t)·∂_s F)``."""
    return kappa * (F + (s - t) * dF_ds)


def velocity_and_ds(net: TVMWrapper, inputs: FlowMapInput) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F_θ(x, t, t − s, c, β), ∂_s F)`` in t's dtype, by one forward-mode JVP in s; ``inputs.gap``
    is ``t − s``.

    The tangent is 1 on s, 0 on x and t (these are closed over, which gives the same numbers
    without propagating zeros), so the gap ``t − s`` carries −1 and ``∂_s F = −∂F/∂gap``. Modes
    (``net.jvp_mode``): ``"explicit"`` propagates the tangent through the layers
    (``DiT.forward_with_tangent``; one ordinary graph, compiles); ``"autograd"`` runs
    ``torch.func.jvp`` through the plain forward (upstream's method; eager only, and without
    activation recomputation, which ``torch.func.jvp`` cannot run through). Both use
    ``net.jvp_attn_backend``; gradients flow through both outputs.
    """
    dgap = -torch.ones_like(inputs.gap)
    if net.jvp_mode == "autograd":

        def velocity_of_gap(gap: torch.Tensor) -> torch.Tensor:
            return net.velocity(inputs._replace(gap=gap), net.jvp_attn_backend, recompute=False)

        out = torch.func.jvp(velocity_of_gap, (inputs.gap,), (dgap,))
        return out[0], out[1]  # (F, ∂_s F): a pair without has_aux
    return net.velocity_with_tangent(inputs, dgap)


def mean_chw(v: torch.Tensor) -> torch.Tensor:
    """Mean over all but the batch dimension: ``[B, ...] → [B]``."""
    return v.flatten(1).mean(dim=1)


# The objective, steps 1–8 -------------------------------------------------------------------------


class FlowMatchingTarget(NamedTuple):
    """What the flow-matching term (step 7) needs from the rest of the objective, none of it with a
    gradient: the online network's inputs ``(x_{s'}, s', 0, c, β)`` and the guided target ``v̂``
    (paper Eq. 14), with ``w = 1/β`` and β (after label dropout), each ``[B, 1, 1, 1]``."""

    inputs: FlowMapInput
    v_hat: torch.Tensor
    w: torch.Tensor
    beta: torch.Tensor


def terminal_term(
    net: TVMWrapper, teacher: TVMWrapper, x: torch.Tensor, labels: torch.Tensor | None, draws: StepDraws
) -> tuple[torch.Tensor, FlowMatchingTarget]:
    """Steps 1–6: the per-sample terminal-velocity term ``[B]`` (gradients flow through the online
    network's JVP) and the flow-matching target, which the one teacher call of batch 2B also gives.

    Args:
        net: the online network; teacher: the target EMA (called without gradient, in eval mode).
        x: encoded data ``[B, C, R, R]`` (fp32); labels: one-hot ``[B, K]`` or None.
        draws: this batch's rows of the step's draws (times and β ``[B, 1, 1, 1]``, β before dropout).
    """
    # 1. Label dropout.
    labels, beta = apply_label_dropout(labels, draws.beta, draws.drop)
    t, s, s_prime, noise = draws.t, draws.s, draws.s_prime, draws.noise
    w = 1.0 / beta
    k = kappa(beta, net.do_scale_param)
    zero_gap = torch.zeros_like(t)

    # 2. Interpolation.
    x_t = interpolate(x, noise, t)
    x_sp = interpolate(x, noise, s_prime)

    # 3–4. The flow map from t to s and its derivative in s, from one JVP of the online network.
    F, dF_ds = velocity_and_ds(net, FlowMapInput(x_t, t, t - s, labels, beta))
    if net.detach_jvp:
        dF_ds = dF_ds.detach()
    f_ts = flow_map(x_t, F, t, s, k)
    dfds = flow_map_derivative(F, dF_ds, t, s, k)

    # 5. Teacher, one call of batch 2B: (f_ts, s, gap 0, c, β) → F_T1 and (x_{s'}, s', gap 0, ∅, 1) → F_T0.
    with torch.no_grad():
        F_T = teacher.velocity(
            FlowMapInput(
                torch.cat([f_ts.detach(), x_sp]),
                torch.cat([s, s_prime]),
                torch.cat([zero_gap, zero_gap]),
                None if labels is None else torch.cat([labels, torch.zeros_like(labels)]),  # then the null class
                torch.cat([beta, torch.ones_like(beta)]),
            )
        )
        F_T1, F_T0 = F_T.chunk(2)
    # Velocities are κ·F (gap 0); F_T0 is never scaled (its β is 1).
    if net.do_scale_param:
        F_T1 = F_T1 * w

    # 6. Terminal-velocity term (paper Eq. 12), zeroed (NaN-preserving) where s ≈ t.
    terminal = mean_chw(((dfds - F_T1) * beta) ** 2)
    terminal = torch.where(torch.isclose(s, t).flatten(), terminal * 0, terminal)
    # 7. Guided flow-matching target (paper Eq. 14) with the unscaled w.
    v_hat = w * (noise - x) + (1 - w) * F_T0
    return terminal, FlowMatchingTarget(FlowMapInput(x_sp, s_prime, zero_gap, labels, beta), v_hat, w, beta)


def flow_matching_term(net: TVMWrapper, target: FlowMatchingTarget) -> torch.Tensor:
    """Step 7's term ``‖u_θ(x_{s'}, s', c, w) − v̂‖²`` weighted by β (step 8), per sample ``[B]``:
    the online velocity at ``(x_{s'}, s')``, κ·F under the scaled parametrisation."""
    F_on = net.velocity(target.inputs)
    if net.do_scale_param:
        F_on = F_on * target.w
    return mean_chw(((F_on - target.v_hat) * target.beta) ** 2)


def tvm_loss(
    net: TVMWrapper, teacher: TVMWrapper, x: torch.Tensor, labels: torch.Tensor | None, draws: StepDraws
) -> dict[str, torch.Tensor]:
    """Per-sample terminal-velocity and flow-matching terms for a batch (module docstring; arguments
    as :func:`terminal_term`).

    Returns:
        ``{"terminal": [B], "fm": [B], "loss": [B]}`` (loss = terminal + fm), in x's dtype.
    """
    terminal, target = terminal_term(net, teacher, x, labels, draws)
    fm = flow_matching_term(net, target)
    # 8. Total (paper Eq. 15); the 1/w² weight is the β inside both squares.
    return {"terminal": terminal, "fm": fm, "loss": terminal + fm}
