"""Two autograd faces over the Triton kernels of :mod:`kernels.attention_jvp`.

(a) :func:`attention_with_tangent` — explicit tangents, ``(q, k, v, tq, tk, tv) -> (O, T)``,
    registered through ``torch.library`` (ops ``tvm::attention_jvp_fwd`` and
    ``tvm::attention_jvp_bwd``) so that ``torch.compile`` traces it without a graph break.
    Its single backward receives (gO, gT) and runs the fused two-pass backward
    (docs/attention_jvp.md §3–§5, 12u + 42u FLOPs). In eager mode the same launchers run
    through a plain autograd.Function, which costs less host time than the custom-op dispatch.

(b) :func:`attention_jvp` — ``(q, k, v) -> O`` as a ``torch.autograd.Function`` with a forward-mode
    rule (docs/attention.md, "func.jvp face"). Its forward runs the primal flash kernel (a correct O, never
    uninitialised memory); under ``torch.func.jvp`` its ``jvp`` rule calls op (a), whose autograd
    node makes T differentiable, so reverse mode reaches all inputs through both O (primal node:
    flash backward, 14u) and T (tangent node: tangent-only backward, HAS_GO=False).
    ``torch.compile``/dynamo drops an autograd.Function's jvp, so (b) is for eager mode.

All tensors are ``[B, H, N, D]``; inputs may be strided views (inputs of one call that do not
share one layout with a unit last stride are copied, see ``attention_jvp._shared_layout``); O and T
are stored token-major (``attention_jvp.token_major``: ``O.transpose(1, 2)`` is contiguous).
"""

from __future__ import annotations

from typing import Any, Optional

import torch

import kernels.attention_jvp as attention_jvp_module
from kernels.attention_jvp import (
    attention_jvp_backward,
    attention_jvp_forward,
    backward_with_key,
    check_inputs,
    forward_with_key,
    output_like,
)

_NAMES = ("q", "k", "v", "tq", "tk", "tv")


# --------------------------------------------------------------------------------------------
# Face (a): torch.library custom ops
# --------------------------------------------------------------------------------------------


@torch.library.custom_op("tvm::attention_jvp_fwd", mutates_args=())
def _attention_jvp_fwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    token_major_order: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (O, T, lse2, μ); lse2 and μ are the fp32 ``[B, H, N]`` row statistics. ``token_major_order``:
    O and T stored token-major (``attention_jvp.TOKEN_MAJOR_OUTPUTS`` at trace time; an argument, so that
    a graph compiled for one layout is never taken from a cache for the other)."""
    out = attention_jvp_forward(q, k, v, tq, tk, tv, token_major_order=token_major_order)
    assert out.t is not None and out.mu is not None  # given the tangents
    return out.o, out.t, out.lse2, out.mu


@_attention_jvp_fwd_op.register_fake
def _attention_jvp_fwd_fake(q, k, v, tq, tk, tv, token_major_order):
    stats_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    stats = q.new_empty(q.shape[:3], dtype=stats_dtype)
    o, t = (output_like(q.shape, q.dtype, q.device, token_major_order) for _ in range(2))  # the kernels' layout
    return o, t, stats, torch.empty_like(stats)


@torch.library.custom_op("tvm::attention_jvp_bwd", mutates_args=())
def _attention_jvp_bwd_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    o: torch.Tensor,
    t: torch.Tensor,
    lse2: torch.Tensor,
    mu: torch.Tensor,
    grad_o: Optional[torch.Tensor],
    grad_t: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (gQ, gK, gV, gtQ, gtK, gtV); a missing grad_t gives zero tangent gradients."""
    grads = attention_jvp_backward(q, k, v, tq, tk, tv, o, t, lse2, mu, grad_o, grad_t)
    if grad_t is None:
        return (*grads[:3], torch.zeros_like(q), torch.zeros_like(q), torch.zeros_like(q))
    gq, gk, gv, gtq, gtk, gtv = grads
    assert gtq is not None and gtk is not None and gtv is not None  # given grad_t
    return gq, gk, gv, gtq, gtk, gtv


@_attention_jvp_bwd_op.register_fake
def _attention_jvp_bwd_fake(q, k, v, tq, tk, tv, o, t, lse2, mu, grad_o, grad_t):
    return tuple(torch.empty(q.shape, dtype=q.dtype, device=q.device) for _ in range(6))


def _fwd_setup_context(ctx: Any, inputs: tuple, output: tuple[torch.Tensor, ...]) -> None:
    o, t, lse2, mu = output
    ctx.save_for_backward(*inputs[:6], o, t, lse2, mu)
    ctx.mark_non_differentiable(lse2, mu)


def _fwd_backward(ctx: Any, grad_o, grad_t, grad_lse2, grad_mu):
    if grad_o is None and grad_t is None:
        return (None,) * 7
    return (*_attention_jvp_bwd_op(*ctx.saved_tensors, grad_o, grad_t), None)


torch.library.register_autograd("tvm::attention_jvp_fwd", _fwd_backward, setup_context=_fwd_setup_context)


class _AttentionWithTangent(torch.autograd.Function):
    """Eager twin of the custom op: same kernels, less host time per call.

    The forward validates the inputs and keeps their launch-plan key (layout, dtype, device,
    alignment; see :func:`kernels.launch_plans.input_key`) for the backward, whose saved inputs are the same
    unmodified tensors (autograd checks their versions), so they are not inspected again.
    """

    @staticmethod
    def forward(ctx, q, k, v, tq, tk, tv):
        out, ctx.plan_key = forward_with_key((q, k, v, tq, tk, tv), True, None)
        ctx.save_for_backward(q, k, v, tq, tk, tv, *out)
        ctx.set_materialize_grads(False)
        return out.o, out.t

    @staticmethod
    def backward(ctx, grad_o, grad_t):
        if grad_o is None and grad_t is None:
            return (None,) * 6
        q, k, v, tq, tk, tv, o, t, lse2, mu = ctx.saved_tensors
        inputs = (q, k, v) if grad_t is None else (q, k, v, tq, tk, tv)
        return backward_with_key(inputs, ctx.plan_key, o, t, lse2, mu, grad_o, grad_t, None)


def attention_with_tangent(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(O, T) of softmax attention and its tangent along (tq, tk, tv) (docs/attention_jvp.md §1), fused.

    O = softmax(Q Kᵀ/√D) V and T = (P⊙(tS − μ)) V + P tV, both ``[B, H, N, D]``; differentiable
    w.r.t. all six inputs through both outputs (one fused backward, docs/attention_jvp.md §3). Under
    ``torch.compile`` this is the custom op ``tvm::attention_jvp_fwd`` (no graph break); in eager
    mode the same kernels run through a plain autograd.Function, whose dispatch costs less host time
    (inputs are validated by the launcher; errors are the same ValueError/TypeError).
    """
    if torch.compiler.is_compiling():
        check_inputs(_NAMES, q, k, v, tq, tk, tv)
        o, t, _, _ = _attention_jvp_fwd_op(q, k, v, tq, tk, tv, attention_jvp_module.TOKEN_MAJOR_OUTPUTS)
        return o, t
    return _AttentionWithTangent.apply(q, k, v, tq, tk, tv)  # the forward launcher validates


# --------------------------------------------------------------------------------------------
# Face (b): autograd.Function with a forward-mode rule
# --------------------------------------------------------------------------------------------


class _AttentionJvp(torch.autograd.Function):
    """O = softmax(Q Kᵀ/√D) V with a fused forward-mode rule (the func.jvp face of docs/attention.md)."""

    @staticmethod
    def forward(q, k, v):
        out = attention_jvp_forward(q, k, v)
        return out.o, out.lse2

    @staticmethod
    def setup_context(ctx, inputs, output):
        o, lse2 = output
        ctx.save_for_backward(*inputs, o, lse2)
        ctx.save_for_forward(*inputs)
        ctx.mark_non_differentiable(lse2)

    @staticmethod
    def backward(ctx, grad_o, grad_lse2):
        q, k, v, o, lse2 = ctx.saved_tensors
        gq, gk, gv, _, _, _ = attention_jvp_backward(q, k, v, None, None, None, o, None, lse2, None, grad_o, None)
        return gq, gk, gv

    @staticmethod
    def jvp(ctx, tq, tk, tv):
        # Under torch.func.jvp the saved tensors and tangents are functorch wrappers; the custom
        # op unwraps them, runs the kernel and records its own autograd node for T.
        q, k, v = ctx.saved_tensors
        tq, tk, tv = [torch.zeros_like(q) if x is None else x for x in (tq, tk, tv)]
        check_inputs(_NAMES, q, k, v, tq, tk, tv)
        _, t, _, _ = _attention_jvp_fwd_op(q, k, v, tq, tk, tv, attention_jvp_module.TOKEN_MAJOR_OUTPUTS)
        return t, None


def attention_jvp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """O = softmax(Q Kᵀ/√D) V, ``[B, H, N, D]``, with a fused rule for ``torch.func.jvp``.

    Outside forward-mode AD it is a plain flash attention with a flash backward. Under
    ``torch.func.jvp`` the tangent is computed by the fused kernel (docs/attention_jvp.md §2) and stays
    differentiable w.r.t. the primal and tangent inputs. Eager mode only.
    """
    check_inputs(_NAMES[:3], q, k, v)
    o, _ = _AttentionJvp.apply(q, k, v)
    return o
