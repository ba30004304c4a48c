"""Forward-mode rules of the DiT's elementary operations, written out (docs/method.md §1.3).

Each function maps a primal input and its tangent ``(x, ẋ)`` to ``(y, ẏ)``, the value and the
directional derivative ``ẏ = J_f(x)·ẋ``. The model's ``forward_with_tangent`` methods chain them,
so the whole JVP becomes one ordinary graph of primal-and-tangent tensors: autograd
differentiates it (second order through the tangent without functorch), ``torch.compile`` traces
it without graph breaks, and each linear layer's tangent is a plain GEMM with the same weight.

The primal outputs are computed with exactly the ops of the plain forward, so ``y`` equals the
plain forward's output; the tangent formulas are checked against ``torch.func.jvp`` in float64
(tests/models/test_tangent.py). Shapes broadcast as in the primal op; tangents have the primal's
shape.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

Pair = tuple[torch.Tensor, torch.Tensor]

_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def linear(x: torch.Tensor, dx: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> Pair:
    """``y = x Wᵀ + b``, ``ẏ = ẋ Wᵀ`` (the bias is constant)."""
    return F.linear(x, weight, bias), F.linear(dx, weight)


def silu(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """``y = x·σ(x)``, ``ẏ = σ(x)·(1 + x·(1 − σ(x)))·ẋ``."""
    sig = torch.sigmoid(x)
    return F.silu(x), dx * (sig * (1 + x * (1 - sig)))


def gelu_tanh(x: torch.Tensor, dx: torch.Tensor) -> Pair:
    """Tanh-approximate GELU ``y = ½x(1 + tanh u)``, ``u = c(x + a x³)``, c = √(2/π), a = 0.044715.

    ``ẏ = [½(1 + tanh u) + ½x(1 − tanh² u)·c(1 + 3a x²)]·ẋ``.
    """
    th = torch.tanh(_GELU_C * (x + _GELU_A * x.pow(3)))
    slope = 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * _GELU_C * (1 + 3 * _GELU_A * x * x)
    return F.gelu(x, approximate="tanh"), dx * slope


def dropout(x: torch.Tensor, dx: torch.Tensor, p: float, training: bool) -> Pair:
    """Dropout with one mask for value and tangent (``ẏ = m ⊙ ẋ / (1 − p)``)."""
    if not training or p == 0.0:
        return x, dx
    keep = torch.empty_like(x).bernoulli_(1 - p) / (1 - p)
    return x * keep, dx * keep


def rms_norm(x: torch.Tensor, dx: torch.Tensor, eps: float, weight: torch.Tensor | None = None) -> Pair:
    """RMSNorm over the last dim ``y = γ·x·r``, ``r = (mean(x²) + ε)^{-1/2}``.

    ``ẏ = γ·r·(ẋ − n·mean(n·ẋ))`` with ``n = x·r`` (the normalised input).
    Primal by ``F.rms_norm``, as in the plain forward.
    """
    y = F.rms_norm(x, (x.shape[-1],), weight, eps)
    x = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in ≥ fp32
    r = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    n = x * r
    dy = r * (dx - n * (n * dx).mean(dim=-1, keepdim=True))
    if weight is not None:
        dy = dy * weight
    return y, dy.to(y.dtype)


def rms_normalize(x: torch.Tensor, dx: torch.Tensor, eps: float) -> Pair:
    """The mod-norm ``y = x·rsqrt(mean(x²) + ε)`` written with elementary ops (as
    :func:`tvm.models.dit.rms_normalize`); same tangent as :func:`rms_norm` without γ."""
    r = torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)
    y = x * r
    return y, r * (dx - y * (y * dx).mean(dim=-1, keepdim=True))


def modulate(x: torch.Tensor, dx: torch.Tensor, shift: Pair, scale: Pair) -> Pair:
    """adaLN ``y = x·(1 + scale) + shift`` with x ``[B, T, D]``, shift/scale ``[B, D]`` pairs.

    ``ẏ = ẋ·(1 + scale) + x·ṡcale + ṡhift``.
    """
    (sh, dsh), (sc, dsc) = shift, scale
    y = x * (1 + sc[:, None]) + sh[:, None]
    return y, dx * (1 + sc[:, None]) + x * dsc[:, None] + dsh[:, None]


def gated_residual(x: torch.Tensor, dx: torch.Tensor, gate: Pair, branch: Pair) -> Pair:
    """``y = x + g·a`` with g ``[B, D]``, a ``[B, T, D]``: ``ẏ = ẋ + ġ·a + g·ȧ``."""
    (g, dg), (a, da) = gate, branch
    return x + g[:, None] * a, dx + dg[:, None] * a + g[:, None] * da
