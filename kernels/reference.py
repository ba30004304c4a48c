"""Math reference for attention and its tangent (docs/attention_jvp.md §1, eq. A1–A3).

Plain PyTorch ops with an explicit softmax, so it works in any dtype (float64 for ground truth),
under ``torch.func.jvp`` and under double backward. Tensors are ``[B, H, N, D]``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def attention_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """O = softmax(c·Q Kᵀ) V with c = scale or 1/√D; O(N²) memory."""
    return torch.matmul(torch.softmax(_scaled_scores(q, k, scale)[0], dim=-1), v)


def _scaled_scores(q: torch.Tensor, k: torch.Tensor, scale: Optional[float]) -> tuple[torch.Tensor, float]:
    """(S = c·Q Kᵀ, c) with c = scale or 1/√D."""
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(q, k.transpose(-2, -1)) * c, c


def attention_tangent_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, T) with the tangent written out (docs/attention_jvp.md eq. A1–A3), as plain differentiable ops.

    ``S = c·Q Kᵀ``, ``P = softmax(S)``, ``O = P V``; ``Ṡ = c·(Q̇ Kᵀ + Q K̇ᵀ)``,
    ``μ = rowsum(P ⊙ Ṡ)``, ``T = (P ⊙ (Ṡ − μ)) V + P V̇``. The primal uses the ops of
    :func:`attention_math`; O(N²) memory.
    """
    scores, c = _scaled_scores(q, k, scale)
    p = torch.softmax(scores, dim=-1)
    d_scores = (torch.matmul(tq, k.transpose(-2, -1)) + torch.matmul(q, tk.transpose(-2, -1))) * c
    centred = p * (d_scores - (p * d_scores).sum(dim=-1, keepdim=True))
    return torch.matmul(p, v), torch.matmul(centred, v) + torch.matmul(p, tv)


def attention_jvp_math(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    scale: Optional[float] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, T) = torch.func.jvp of :func:`attention_math` at (q, k, v) along (tq, tk, tv).

    Differentiable with respect to all six inputs (reverse mode through both outputs).
    """
    out = torch.func.jvp(lambda a, b, c: attention_math(a, b, c, scale), (q, k, v), (tq, tk, tv))
    return out[0], out[1]  # (output, tangent): a pair without has_aux
