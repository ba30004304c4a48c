"""Triton kernels: attention with a fused forward-mode tangent and a backward through both outputs.

Math (per batch·head, docs/attention_jvp.md §1), with c the softmax scale:

    S  = c·Q Kᵀ,  P = softmax_row(S),  O = P V
    tS = c·(tQ Kᵀ + Q tKᵀ),  μ = rowsum(P⊙tS),  T = (P⊙(tS − μ)) V + P tV

Forward (§1.3, centred variant; §5.2): one program per block of query rows streams the key
blocks with online softmax and keeps two fp32 ``[BLOCK_M, D]`` accumulators (A for O, B for the
centred T) and the row statistics m, ℓ, ν. It stores O, T and two fp32 statistics per row:
``lse2`` = log₂ Σ_j 2^(S_ij·log₂e) (the log-sum-exp in base 2 of the scaled scores) and μ.

Backward (§1.4, §5.3): by default two passes, no atomics, deterministic.
* pass Q (query-stationary) writes δP = rowsum(gO⊙O) + rowsum(gT⊙T) and δG = rowsum(gT⊙O),
  then accumulates gQ = c·(gS K + gtS tK) and gtQ = c·gtS K;
* pass KV (key-stationary) accumulates gK = c·(gSᵀQ + gtSᵀtQ), gtK = c·gtSᵀQ,
  gV = PᵀgO + (P⊙(tS − μ))ᵀgT and gtV = PᵀgT,
with gtS = P⊙(gT Vᵀ − δG) and gS = P⊙(gO Vᵀ + gT tVᵀ − δP) + (tS − μ)⊙gtS.
One-pass backward (``TVM_ATTENTION_BACKWARD=one-pass``, or ``ONE_PASS_BACKWARD = True`` on this
module; experimental): a small kernel writes δP, δG, then pass KV also adds each key block's share of
gQ = c·(gS K + gtS tK) and gtQ = c·gtS K (the sums over its keys) into fp32 buffers with atomic adds. It skips pass Q's
recomputation of S, tS, P and the three products with V (30u instead of 42u for both gradients),
at the price of nondeterministic sums (the order of the atomic adds varies from run to run).
Measured slower on an H100 (+28 to +48% forward+backward at N=256 and 1024; docs/benchmarks.md, Round 10).
The constexpr flags HAS_GO / HAS_GT select the fused, primal-only (plain flash backward) and
tangent-only variants from the same code.

Tensors are ``[B, H, N, D]``. The inputs of one call are addressed with one set of (b, h, n)
strides (any strides with a unit last stride, e.g. views of a fused qkv buffer; inputs with
differing layouts are copied). O and T are stored token-major, in ``[B, N, H, D]`` order
(:func:`token_major`), so that ``O.transpose(1, 2).reshape(B, N, H·D)`` before the output projection is
a view and the gradients gO, gT coming back through it already have O's layout; O, T, gO and gT are
addressed with that second set of strides (gO or gT in another layout is copied into it). The input
gradients are contiguous.
The head dimension is padded to a power of two (≥ 16) with masked loads; N is arbitrary (the
partial last block is masked). 16-bit inputs use fp32 accumulation; fp32 inputs use true fp32
dots (``input_precision="ieee"``); fp64 inputs (interpreter only) run in fp64 throughout.

The launchers repeat a call with a known input signature through :mod:`kernels.launch_plans`
(the compiled kernels launched directly, without the autotuner and the JIT).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels import launch_plans
from kernels.launch_plans import is_interpreting

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _one_pass_from_environment() -> bool:
    """``TVM_ATTENTION_BACKWARD``: ``two-pass`` (default) or ``one-pass`` (see the module docstring)."""
    value = os.environ.get("TVM_ATTENTION_BACKWARD", "two-pass")
    if value not in ("two-pass", "one-pass"):
        raise ValueError(f"TVM_ATTENTION_BACKWARD={value!r}: expected two-pass (the default) or one-pass")
    return value == "one-pass"


ONE_PASS_BACKWARD = _one_pass_from_environment()


@contextlib.contextmanager
def one_pass_backward(enabled: bool = True) -> Iterator[None]:
    """Set :data:`ONE_PASS_BACKWARD` for a block of code (restored after it)."""
    global ONE_PASS_BACKWARD
    previous, ONE_PASS_BACKWARD = ONE_PASS_BACKWARD, enabled
    try:
        yield
    finally:
        ONE_PASS_BACKWARD = previous


# O and T are stored token-major (see the module docstring); False stores them as contiguous [B, H, N, D],
# as before 2026-12-07, for bench/step.py's A/B (outputs=contiguous; docs/benchmarks.md, Round 12).
TOKEN_MAJOR_OUTPUTS = True


@contextlib.contextmanager
def token_major_outputs(enabled: bool = True) -> Iterator[None]:
    """Set :data:`TOKEN_MAJOR_OUTPUTS` for a block of code (restored after it; compiled code reads it when
    traced and passes it to the custom op, so a change retraces)."""
    global TOKEN_MAJOR_OUTPUTS
    previous, TOKEN_MAJOR_OUTPUTS = TOKEN_MAJOR_OUTPUTS, enabled
    try:
        yield
    finally:
        TOKEN_MAJOR_OUTPUTS = previous


# --------------------------------------------------------------------------------------------
# Autotuning spaces of the forward and the two backward passes (docs/attention_jvp.md §4), keyed
# on (N, D, dtype). The interpreter gets one small config; on the GPU each space is pruned by head
# dim and dtype (fp32 and fp64 get one config).
# --------------------------------------------------------------------------------------------


def _config(block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)


_INTERPRETER_CONFIGS = [_config(16, 16, 1, 1)]
_FWD_CONFIGS = [
    _config(64, 64, 4, 3),
    _config(128, 64, 8, 3),
    _config(64, 128, 4, 3),
    _config(128, 32, 8, 3),
    _config(64, 32, 4, 3),
    _config(32, 32, 4, 1),
]
_BWD_Q_CONFIGS = [
    _config(64, 64, 4, 2),
    _config(128, 64, 8, 2),
    _config(64, 32, 4, 3),
    _config(32, 64, 4, 2),
    _config(32, 32, 4, 1),
]
_BWD_KV_CONFIGS = [
    _config(64, 64, 4, 2),
    _config(32, 64, 4, 2),
    _config(64, 128, 8, 2),
    _config(64, 32, 4, 2),
    _config(32, 128, 8, 2),
    _config(32, 32, 4, 1),
]
# Extra candidates tried only for short sequences (N ≤ 512) with D_PAD ≤ 64, where each program's
# loop runs a few iterations and pipelining depth and warp count weigh differently.
_SMALL_N_FWD = [_config(64, 64, 4, 2), _config(64, 64, 4, 4), _config(64, 32, 4, 2), _config(128, 64, 8, 2)]
_SMALL_N_BWD_Q = [_config(64, 32, 4, 2), _config(64, 32, 8, 3), _config(64, 64, 4, 3), _config(64, 16, 4, 3)]
_SMALL_N_BWD_KV = [_config(32, 64, 4, 3), _config(32, 64, 8, 2), _config(16, 64, 4, 2), _config(64, 64, 8, 2)]
_SMALL_N_ONLY = _SMALL_N_FWD + _SMALL_N_BWD_Q + _SMALL_N_BWD_KV
_FWD_CONFIGS += _SMALL_N_FWD
_BWD_Q_CONFIGS += _SMALL_N_BWD_Q
_BWD_KV_CONFIGS += _SMALL_N_BWD_KV
# Pass KV of the one-pass backward (FUSE_Q) holds more live tiles: at every N it also tries the two tiles
# that spill least there (bench/kernel_resources.py: 16×64 with 4 warps none, 32×64 with 8 warps 72 bytes).
_BWD_KV_FUSED_Q_CONFIGS = _BWD_KV_CONFIGS + [_config(16, 64, 4, 2), _config(32, 64, 8, 2)]
_FP32_CONFIG = (32, 32)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the small fp32 tile for 32/64-bit inputs, tiles of ≤ 64 rows for D_PAD = 128, the
    short-sequence candidates only for N ≤ 512 and D_PAD ≤ 64, and each tile once."""
    args = {**named_args, **kwargs}
    if args["Q"].dtype in (torch.float32, torch.float64):
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == _FP32_CONFIG]
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != _FP32_CONFIG]
    if args["D_PAD"] > 64:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64]
    if args["N_CTX"] > 512 or args["D_PAD"] > 64:
        kept = [c for c in kept if not any(c is extra for extra in _SMALL_N_ONLY)]
    unique: dict[tuple, triton.Config] = {}
    for c in kept:  # the first of equal configs, in the list's order
        unique.setdefault((c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages), c)
    return list(unique.values())


def _autotune(configs: list[triton.Config], reset_to_zero: Optional[list[str]] = None, key_extra: tuple = ()):
    """Tuned on (N, D, ``key_extra``, the tensors' dtypes); ``reset_to_zero``: buffers the kernel adds into
    atomically, zeroed before each timed trial and before the real launch."""
    if is_interpreting():
        return triton.autotune(configs=_INTERPRETER_CONFIGS, key=["N_CTX", "HEAD_DIM"], reset_to_zero=reset_to_zero)
    return triton.autotune(
        configs=configs,
        key=["N_CTX", "HEAD_DIM", *key_extra],
        prune_configs_by={"early_config_prune": _prune},
        reset_to_zero=reset_to_zero,
    )


# --------------------------------------------------------------------------------------------
# Tile helpers
# --------------------------------------------------------------------------------------------


@triton.jit
def _head_base(ptr, pid_bh, H, stride_b, stride_h):
    """Pointer to element [b, h, 0, 0] of a [B, H, N, D] tensor, with pid_bh = b·H + h."""
    b = pid_bh // H
    h = pid_bh % H
    return ptr + b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h


@triton.jit
def _contiguous_base(ptr, pid_bh, N_CTX, HEAD_DIM: tl.constexpr):
    """Pointer to head pid_bh of a contiguous [B, H, N, HEAD_DIM] tensor (the input gradients)."""
    return ptr + pid_bh.to(tl.int64) * N_CTX * HEAD_DIM


@triton.jit
def _load_tile(base, rows, dims, stride_n, N_CTX, HEAD_DIM: tl.constexpr):
    """Load rows × dims of one head; rows ≥ N and padded dims read as 0."""
    mask = (rows[:, None] < N_CTX) & (dims[None, :] < HEAD_DIM)
    return tl.load(base + rows[:, None] * stride_n + dims[None, :], mask=mask, other=0.0)


@triton.jit
def _store_tile(base, rows, dims, stride_n, N_CTX, HEAD_DIM: tl.constexpr, value):
    mask = (rows[:, None] < N_CTX) & (dims[None, :] < HEAD_DIM)
    tl.store(base + rows[:, None] * stride_n + dims[None, :], value.to(base.dtype.element_ty), mask=mask)


@triton.jit
def _add_tile(base, rows, dims, N_CTX, HEAD_DIM: tl.constexpr, value):
    """Atomically add rows × dims into one head of a contiguous fp32/fp64 [B, H, N, HEAD_DIM] buffer."""
    mask = (rows[:, None] < N_CTX) & (dims[None, :] < HEAD_DIM)
    tl.atomic_add(base + rows[:, None] * HEAD_DIM + dims[None, :], value, mask=mask, sem="relaxed")


@triton.jit
def _load_row_stat(ptr, pid_bh, rows, N_CTX, other):
    return tl.load(ptr + pid_bh.to(tl.int64) * N_CTX + rows, mask=rows < N_CTX, other=other)


@triton.jit
def _store_row_stat(ptr, pid_bh, rows, N_CTX, value):
    tl.store(ptr + pid_bh.to(tl.int64) * N_CTX + rows, value, mask=rows < N_CTX)


# --------------------------------------------------------------------------------------------
# Fused forward (docs/attention_jvp.md §2, centred)
# --------------------------------------------------------------------------------------------


@_autotune(_FWD_CONFIGS)
@triton.jit
def _attention_jvp_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, T, LSE2, MU,
    sb, sh, sn, ob, oh, on,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_M), B·H). Writes O, lse2 and, with HAS_TANGENT, T and μ."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    k_base = _head_base(K, pid_bh, H, sb, sh)
    v_base = _head_base(V, pid_bh, H, sb, sh)
    q = _load_tile(_head_base(Q, pid_bh, H, sb, sh), rows, dims, sn, N_CTX, HEAD_DIM)
    scale = tl.full([], SCALE, ACC_DTYPE)
    qk_scale = tl.full([], SCALE * LOG2E, ACC_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc_o = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)
    if HAS_TANGENT:
        tk_base = _head_base(TK, pid_bh, H, sb, sh)
        tv_base = _head_base(TV, pid_bh, H, sb, sh)
        tq = _load_tile(_head_base(TQ, pid_bh, H, sb, sh), rows, dims, sn, N_CTX, HEAD_DIM)
        nu_i = tl.zeros([BLOCK_M], ACC_DTYPE)
        mean_i = tl.zeros([BLOCK_M], ACC_DTYPE)
        acc_t = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)

    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, sn, N_CTX, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, sn, N_CTX, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        s = tl.where(cols[None, :] < N_CTX, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_new = l_i * alpha + tl.sum(p, 1)
        if HAS_TANGENT:
            tk = _load_tile(tk_base, cols, dims, sn, N_CTX, HEAD_DIM)
            tv = _load_tile(tv_base, cols, dims, sn, N_CTX, HEAD_DIM)
            ts = tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * scale
            nu_i = nu_i * alpha + tl.sum(p * ts, 1)
            mean_new = nu_i / l_new
            acc_t = acc_t * alpha[:, None] + ((mean_i - mean_new) * alpha)[:, None] * acc_o
            p_centred = p * (ts - mean_new[:, None])
            acc_t = tl.dot(p_centred.to(v.dtype), v, acc_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc_t = tl.dot(p.to(tv.dtype), tv, acc_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            mean_i = mean_new
        acc_o = acc_o * alpha[:, None]
        acc_o = tl.dot(p.to(v.dtype), v, acc_o, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        l_i = l_new
        m_i = m_new

    inv_l = 1.0 / l_i
    _store_tile(_head_base(O, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM, acc_o * inv_l[:, None])
    _store_row_stat(LSE2, pid_bh, rows, N_CTX, m_i + tl.math.log2(l_i))
    if HAS_TANGENT:
        _store_tile(_head_base(T, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM, acc_t * inv_l[:, None])
        _store_row_stat(MU, pid_bh, rows, N_CTX, mean_i)


# --------------------------------------------------------------------------------------------
# Backward pass Q (query-stationary; docs/attention_jvp.md §4)
# --------------------------------------------------------------------------------------------


@_autotune(_BWD_Q_CONFIGS)
@triton.jit
def _attention_jvp_bwd_q_kernel(
    Q, K, V, TQ, TK, TV, O, T, GO, GT, LSE2, MU, DELTA, GQ, GTQ,
    sb, sh, sn, ob, oh, on,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_M), B·H). Writes δP, δG (rows of DELTA[0], DELTA[1]) and gQ, gtQ.

    DELTA is a ``[2, B, H, N]`` buffer (``[1, B, H, N]`` without HAS_GT); gtQ only with HAS_GT.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    DELTA_P = DELTA
    DELTA_G = DELTA + tl.num_programs(1).to(tl.int64) * N_CTX
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    k_base = _head_base(K, pid_bh, H, sb, sh)
    v_base = _head_base(V, pid_bh, H, sb, sh)
    q = _load_tile(_head_base(Q, pid_bh, H, sb, sh), rows, dims, sn, N_CTX, HEAD_DIM)
    lse2 = _load_row_stat(LSE2, pid_bh, rows, N_CTX, 0.0)
    scale = tl.full([], SCALE, ACC_DTYPE)
    qk_scale = tl.full([], SCALE * LOG2E, ACC_DTYPE)

    delta_p = tl.zeros([BLOCK_M], ACC_DTYPE)
    if HAS_GO or HAS_GT:
        o = _load_tile(_head_base(O, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM).to(ACC_DTYPE)
    if HAS_GO:
        go = _load_tile(_head_base(GO, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM)
        delta_p += tl.sum(go.to(ACC_DTYPE) * o, 1)
    if HAS_GT:
        gt = _load_tile(_head_base(GT, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM)
        t = _load_tile(_head_base(T, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM).to(ACC_DTYPE)
        tq = _load_tile(_head_base(TQ, pid_bh, H, sb, sh), rows, dims, sn, N_CTX, HEAD_DIM)
        tk_base = _head_base(TK, pid_bh, H, sb, sh)
        tv_base = _head_base(TV, pid_bh, H, sb, sh)
        mu = _load_row_stat(MU, pid_bh, rows, N_CTX, 0.0)
        delta_p += tl.sum(gt.to(ACC_DTYPE) * t, 1)
        delta_g = tl.sum(gt.to(ACC_DTYPE) * o, 1)
        _store_row_stat(DELTA_G, pid_bh, rows, N_CTX, delta_g)
        acc_gtq = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)
    _store_row_stat(DELTA_P, pid_bh, rows, N_CTX, delta_p)
    acc_gq = tl.zeros([BLOCK_M, D_PAD], ACC_DTYPE)

    for start_n in range(0, N_CTX, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, cols, dims, sn, N_CTX, HEAD_DIM)
        v = _load_tile(v_base, cols, dims, sn, N_CTX, HEAD_DIM)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        s = tl.where(cols[None, :] < N_CTX, s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        if HAS_GT:
            tk = _load_tile(tk_base, cols, dims, sn, N_CTX, HEAD_DIM)
            tv = _load_tile(tv_base, cols, dims, sn, N_CTX, HEAD_DIM)
            dp = tl.dot(gt, tl.trans(tv), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_GO:
                dp = tl.dot(go, tl.trans(v), dp, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dtp = tl.dot(gt, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts = tl.dot(tq, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts = tl.dot(q, tl.trans(tk), ts, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts_centred = ts * scale - mu[:, None]
            gts = p * (dtp - delta_g[:, None])
            gs = p * (dp - delta_p[:, None]) + ts_centred * gts
            acc_gq = tl.dot(gs.to(k.dtype), k, acc_gq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc_gq = tl.dot(gts.to(tk.dtype), tk, acc_gq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc_gtq = tl.dot(gts.to(k.dtype), k, acc_gtq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            dp = tl.dot(go, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            gs = p * (dp - delta_p[:, None])
            acc_gq = tl.dot(gs.to(k.dtype), k, acc_gq, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)

    _store_tile(_contiguous_base(GQ, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gq * scale)
    if HAS_GT:
        _store_tile(
            _contiguous_base(GTQ, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtq * scale
        )


# --------------------------------------------------------------------------------------------
# Row statistics of the one-pass backward (what pass Q writes first in the two-pass one)
# --------------------------------------------------------------------------------------------


@triton.autotune(
    configs=[
        triton.Config(
            {"BLOCK_M": 16 if is_interpreting() else 64}, num_warps=1 if is_interpreting() else 4, num_stages=1
        )
    ],
    key=[],
)
@triton.jit
def _attention_jvp_bwd_delta_kernel(
    O, T, GO, GT, DELTA,
    ob, oh, on,
    H, N_CTX,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_M), B·H). Writes δP = rowsum(gO⊙O) + rowsum(gT⊙T) and, with HAS_GT,
    δG = rowsum(gT⊙O) (rows of DELTA[0], DELTA[1])."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D_PAD)
    o = _load_tile(_head_base(O, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM).to(ACC_DTYPE)
    delta_p = tl.zeros([BLOCK_M], ACC_DTYPE)
    if HAS_GO:
        go = _load_tile(_head_base(GO, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM)
        delta_p += tl.sum(go.to(ACC_DTYPE) * o, 1)
    if HAS_GT:
        gt = _load_tile(_head_base(GT, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM)
        t = _load_tile(_head_base(T, pid_bh, H, ob, oh), rows, dims, on, N_CTX, HEAD_DIM)
        delta_p += tl.sum(gt.to(ACC_DTYPE) * t.to(ACC_DTYPE), 1)
        delta_g = tl.sum(gt.to(ACC_DTYPE) * o, 1)
        _store_row_stat(DELTA + tl.num_programs(1).to(tl.int64) * N_CTX, pid_bh, rows, N_CTX, delta_g)
    _store_row_stat(DELTA, pid_bh, rows, N_CTX, delta_p)


# --------------------------------------------------------------------------------------------
# Backward pass KV (key-stationary; docs/attention_jvp.md §4)
# --------------------------------------------------------------------------------------------


@triton.jit
def _attention_jvp_bwd_kv(
    Q, K, V, TQ, TK, TV, GO, GT, LSE2, MU, DELTA, GK, GV, GTK, GTV, GQ, GTQ,
    sb, sh, sn, ob, oh, on,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, FUSE_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Grid (cdiv(N, BLOCK_N), B·H); loops over query blocks of BLOCK_M rows.

    Reads δP, δG from DELTA (written by pass Q, or by the δ kernel). Writes gK, gV and, with HAS_GT,
    gtK, gtV (contiguous). With FUSE_Q (the one-pass backward) it also adds this key block's share of
    gQ and, with HAS_GT, gtQ into GQ, GTQ (contiguous, in the accumulation dtype, zeroed by the caller);
    without it GQ and GTQ are not touched.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    DELTA_P = DELTA
    DELTA_G = DELTA + tl.num_programs(1).to(tl.int64) * N_CTX
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    q_base = _head_base(Q, pid_bh, H, sb, sh)
    k = _load_tile(_head_base(K, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
    v = _load_tile(_head_base(V, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
    scale = tl.full([], SCALE, ACC_DTYPE)
    qk_scale = tl.full([], SCALE * LOG2E, ACC_DTYPE)
    acc_gk = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)
    acc_gv = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)
    if FUSE_Q:
        gq_base = _contiguous_base(GQ, pid_bh, N_CTX, HEAD_DIM)
        gtq_base = _contiguous_base(GTQ, pid_bh, N_CTX, HEAD_DIM)
    if HAS_GO:
        go_base = _head_base(GO, pid_bh, H, ob, oh)
    if HAS_GT:
        tq_base = _head_base(TQ, pid_bh, H, sb, sh)
        gt_base = _head_base(GT, pid_bh, H, ob, oh)
        tk = _load_tile(_head_base(TK, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
        tv = _load_tile(_head_base(TV, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
        acc_gtk = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)
        acc_gtv = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)

    for start_m in range(0, N_CTX, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, rows, dims, sn, N_CTX, HEAD_DIM)
        lse2 = _load_row_stat(LSE2, pid_bh, rows, N_CTX, float("inf"))
        delta_p = _load_row_stat(DELTA_P, pid_bh, rows, N_CTX, 0.0)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        if HAS_GO:
            go = _load_tile(go_base, rows, dims, on, N_CTX, HEAD_DIM)
            acc_gv = tl.dot(p_t.to(go.dtype), go, acc_gv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_GT:
            tq = _load_tile(tq_base, rows, dims, sn, N_CTX, HEAD_DIM)
            gt = _load_tile(gt_base, rows, dims, on, N_CTX, HEAD_DIM)
            mu = _load_row_stat(MU, pid_bh, rows, N_CTX, 0.0)
            delta_g = _load_row_stat(DELTA_G, pid_bh, rows, N_CTX, 0.0)
            ts_t = tl.dot(k, tl.trans(tq), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts_t = tl.dot(tk, tl.trans(q), ts_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            ts_centred_t = ts_t * scale - mu[None, :]
            acc_gtv = tl.dot(p_t.to(gt.dtype), gt, acc_gtv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            tp_t = p_t * ts_centred_t
            acc_gv = tl.dot(tp_t.to(gt.dtype), gt, acc_gv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dtp_t = tl.dot(v, tl.trans(gt), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            gts_t = p_t * (dtp_t - delta_g[None, :])
            acc_gtk = tl.dot(gts_t.to(q.dtype), q, acc_gtk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            dp_t = tl.dot(tv, tl.trans(gt), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_GO:
                dp_t = tl.dot(v, tl.trans(go), dp_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            gs_t = p_t * (dp_t - delta_p[None, :]) + ts_centred_t * gts_t
            acc_gk = tl.dot(gs_t.to(q.dtype), q, acc_gk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            acc_gk = tl.dot(gts_t.to(tq.dtype), tq, acc_gk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            dp_t = tl.dot(v, tl.trans(go), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            gs_t = p_t * (dp_t - delta_p[None, :])
            acc_gk = tl.dot(gs_t.to(q.dtype), q, acc_gk, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if FUSE_Q:  # gQ += c·(gS K + gtS tK), gtQ += c·gtS K over this key block (rows of gSᵀ are keys)
            gs = tl.trans(gs_t).to(k.dtype)
            part = tl.dot(gs, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if HAS_GT:
                gts = tl.trans(gts_t).to(k.dtype)
                part = tl.dot(gts, tk, part, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                gtq_part = tl.dot(gts, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                _add_tile(gtq_base, rows, dims, N_CTX, HEAD_DIM, gtq_part * scale)
            _add_tile(gq_base, rows, dims, N_CTX, HEAD_DIM, part * scale)

    _store_tile(_contiguous_base(GK, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gk * scale)
    _store_tile(_contiguous_base(GV, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gv)
    if HAS_GT:
        _store_tile(
            _contiguous_base(GTK, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtk * scale
        )
        _store_tile(_contiguous_base(GTV, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtv)


_attention_jvp_bwd_kv_kernel = _autotune(_BWD_KV_CONFIGS)(_attention_jvp_bwd_kv)
# The one-pass face: its own tuning results, in memory and on disk (FUSE_Q in the key: it changes the
# work per program), and the gQ/gtQ buffers zeroed around the autotuner's timed trials, which add into them.
_attention_jvp_bwd_kv_fused_q_kernel = _autotune(_BWD_KV_FUSED_Q_CONFIGS, ["GQ", "GTQ"], ("FUSE_Q",))(
    _attention_jvp_bwd_kv
)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class ForwardResult(NamedTuple):
    """Outputs of :func:`attention_jvp_forward` (shapes for inputs ``[B, H, N, D]``).

    ``o``, ``t``: ``[B, H, N, D]`` in the input dtype, stored token-major (:func:`token_major`; ``t`` is
    None without tangents).
    ``lse2``: ``[B, H, N]`` base-2 log-sum-exp of the scaled scores (fp32; fp64 for fp64 input).
    ``mu``: ``[B, H, N]`` μ = Σ_j P_ij·tS_ij (None without tangents).
    """

    o: torch.Tensor
    t: Optional[torch.Tensor]
    lse2: torch.Tensor
    mu: Optional[torch.Tensor]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _kernel_dtype_args(dtype: torch.dtype, head_dim: int) -> dict[str, Any]:
    """Constexprs shared by all kernels: padded head dim, accumulator dtype, dot precision."""
    return {
        "HEAD_DIM": head_dim,
        "D_PAD": max(16, triton.next_power_of_2(head_dim)),
        "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
        "DOT_PRECISION": "ieee" if dtype in (torch.float32, torch.float64) else "tf32",
    }


def _empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Allocation of the row statistics (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_like(x: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor shaped like x: the [B, H, N, D] input gradients (tests replace it too)."""
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def token_major(shape: torch.Size | tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised ``[B, H, N, D]`` tensor stored in ``[B, N, H, D]`` order: the layout of O and T,
    whose ``transpose(1, 2)`` is contiguous (strides ``(N·H·D, D, H·D, 1)``)."""
    batch, heads, n_ctx, head_dim = shape
    return torch.empty((batch, n_ctx, heads, head_dim), dtype=dtype, device=device).transpose(1, 2)


def output_like(
    shape: torch.Size | tuple[int, ...],
    dtype: torch.dtype,
    device: torch.device,
    token_major_order: Optional[bool] = None,
) -> torch.Tensor:
    """An uninitialised ``[B, H, N, D]`` tensor in the layout of O and T: :func:`token_major`, or contiguous
    where ``token_major_order`` is False (None: :data:`TOKEN_MAJOR_OUTPUTS`)."""
    if TOKEN_MAJOR_OUTPUTS if token_major_order is None else token_major_order:
        return token_major(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device)


def _empty_output_like(x: torch.Tensor, token_major_order: bool) -> torch.Tensor:
    """A tensor shaped like x in the outputs' layout (:func:`output_like`): O and T (tests replace it too)."""
    return output_like(x.shape, x.dtype, x.device, token_major_order)


def _layout(x: torch.Tensor) -> tuple[int, ...]:
    """Strides that matter for addressing (a dimension of size 1 is never stepped over)."""
    return _addressed(x.stride(), x.shape)


def _addressed(strides: tuple[int, ...], shape: torch.Size) -> tuple[int, ...]:
    """:func:`_layout` of a tensor with these strides and shape."""
    return tuple(stride if size > 1 else 0 for stride, size in zip(strides, shape))


def _shared_layout(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs, copied to contiguous memory unless all share one layout with unit last stride.

    The kernels address all inputs of a call with one set of (b, h, n) strides, which keeps the
    launch cheap (few arguments); q, k, v views of one fused qkv buffer share their layout.
    """
    layouts = {_layout(x) for x in tensors}
    if len(layouts) == 1 and tensors[0].stride(-1) == 1:
        return list(tensors)
    return [x.contiguous() for x in tensors]


def _output_layout(shape: torch.Size, token_major_order: bool) -> tuple[int, ...]:
    """:func:`_layout` of an :func:`output_like` tensor of this shape."""
    batch, heads, n_ctx, head_dim = shape
    if token_major_order:
        strides = (n_ctx * heads * head_dim, head_dim, heads * head_dim, 1)
    else:
        strides = (heads * n_ctx * head_dim, n_ctx * head_dim, head_dim, 1)
    return _addressed(strides, shape)


def _in_output_layout(x: torch.Tensor, dtype: torch.dtype, token_major_order: bool) -> torch.Tensor:
    """x as an :func:`output_like` tensor of dtype (O, T and the upstream gradients gO, gT): x itself when
    it is one already (the outputs, and gradients coming back through ``O.transpose(1, 2)``)."""
    if x.dtype == dtype and _layout(x) == _output_layout(x.shape, token_major_order):
        return x
    return output_like(x.shape, dtype, x.device, token_major_order).copy_(x)


def check_inputs(names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    """Raise ValueError/TypeError with a clear message for inputs the kernels do not support."""
    ref = tensors[0]
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention_jvp: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention_jvp: {name} must have shape [B, H, N, D], got {tuple(x.shape)}")
        if x.shape != ref.shape:
            raise ValueError(f"attention_jvp: {name} has shape {tuple(x.shape)} but {names[0]} has {tuple(ref.shape)}")
        if x.dtype != ref.dtype:
            raise TypeError(f"attention_jvp: {name} has dtype {x.dtype} but {names[0]} has {ref.dtype}")
        if x.device != ref.device:
            raise ValueError(f"attention_jvp: {name} is on {x.device} but {names[0]} is on {ref.device}")
    if ref.dtype not in _SUPPORTED_DTYPES:
        raise TypeError(f"attention_jvp: dtype {ref.dtype} not supported (use fp16, bf16, fp32 or fp64)")
    if ref.device.type != "cuda" and not is_interpreting():
        raise ValueError(
            f"attention_jvp: tensors are on {ref.device}; the Triton kernels need CUDA tensors "
            "(or TRITON_INTERPRET=1 for CPU runs)"
        )
    if ref.dtype == torch.float64 and not is_interpreting():
        raise TypeError("attention_jvp: fp64 is supported only under TRITON_INTERPRET=1")
    if ref.shape[-1] > 128:
        raise ValueError(f"attention_jvp: head dim {ref.shape[-1]} > 128 is not supported")
    if ref.shape[2] == 0 or ref.shape[0] * ref.shape[1] == 0:
        raise ValueError(f"attention_jvp: empty input of shape {tuple(ref.shape)}")


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


_INPUT_NAMES = ("q", "k", "v", "tq", "tk", "tv")


def _six(inputs: tuple) -> tuple:
    """(q, k, v, tq, tk, tv); without tangents q, k, v stand in for them (the kernels skip them)."""
    return inputs if len(inputs) == 6 else (*inputs, *inputs)


def _validated(inputs: tuple, key: Optional[tuple]) -> tuple[tuple, bool]:
    """The dispatch path's inputs: validated, in one shared layout, as six (see :func:`_six`); and
    whether a plan may be recorded for ``key`` (only when no input had to be copied)."""
    check_inputs(_INPUT_NAMES[: len(inputs)], *inputs)
    shared = _shared_layout(*inputs)
    record = key is not None and all(a is b for a, b in zip(shared, inputs))
    return _six(tuple(shared)), record


def _grid(n_ctx: int, batch_heads: int, block: str) -> Any:
    """Grid function (cdiv(N, meta[block]), B·H): one program per ``block`` rows of one head."""
    return lambda meta: (triton.cdiv(n_ctx, meta[block]), batch_heads)


def forward_with_key(
    inputs: tuple, has_tangent: bool, scale: Optional[float], token_major_order: Optional[bool] = None
) -> tuple[ForwardResult, Optional[tuple]]:
    """Forward on (q, k, v[, tq, tk, tv]); also returns the inputs' launch-plan key
    (:func:`kernels.launch_plans.input_key`; None: no plan applies), for :func:`backward_with_key`.
    ``token_major_order``: the layout of O and T (None: :data:`TOKEN_MAJOR_OUTPUTS`).

    With a recorded plan for these inputs' key, the compiled kernel is launched directly (the
    inputs passed validation when the plan was made); else through the autotuner and the JIT.
    """
    token_major_order = TOKEN_MAJOR_OUTPUTS if token_major_order is None else token_major_order
    key = launch_plans.input_key(inputs)
    plan_key = ("fwd", key, has_tangent, scale, token_major_order)
    plan = launch_plans.lookup(plan_key) if key is not None else None
    six, record = (_six(inputs), False) if plan is not None else _validated(inputs, key)
    q = six[0]
    batch, heads, n_ctx, head_dim = q.shape
    stats_dtype = _acc_dtype(q.dtype)
    o = _empty_output_like(q, token_major_order)
    t = _empty_output_like(q, token_major_order) if has_tangent else o
    lse2 = _empty((batch, heads, n_ctx), stats_dtype, q.device)
    mu = _empty(lse2.shape, stats_dtype, q.device) if has_tangent else lse2
    if plan is not None:
        plan[0](*six, o, t, lse2, mu)
    else:
        constexprs = dict(
            SCALE=default_scale(head_dim) if scale is None else float(scale),
            HAS_TANGENT=has_tangent,
            **_kernel_dtype_args(q.dtype, head_dim),
        )
        launch = launch_plans.launch_and_record(
            _attention_jvp_fwd_kernel,
            _grid(n_ctx, batch * heads, "BLOCK_M"),
            (*six, o, t, lse2, mu),
            (*q.stride()[:3], *o.stride()[:3], heads, n_ctx),
            constexprs,
            q.get_device(),
            record,
        )
        if launch is not None:
            launch_plans.record(plan_key, (launch,))
    return ForwardResult(o, t if has_tangent else None, lse2, mu if has_tangent else None), key


def attention_jvp_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: Optional[torch.Tensor] = None,
    tk: Optional[torch.Tensor] = None,
    tv: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    token_major_order: Optional[bool] = None,
) -> ForwardResult:
    """Fused forward (docs/attention_jvp.md §2): O = softmax(c·QKᵀ)V and, given all three tangents, T.

    All tensors are ``[B, H, N, D]`` of one dtype and device. Without tangents this is a plain
    flash forward (4u FLOPs); with them the fused primal+tangent forward (12u, docs/attention_jvp.md §5).
    ``token_major_order``: O and T stored token-major (None: :data:`TOKEN_MAJOR_OUTPUTS`).
    """
    if tq is not None and tk is not None and tv is not None:
        return forward_with_key((q, k, v, tq, tk, tv), True, scale, token_major_order)[0]
    if tq is None and tk is None and tv is None:
        return forward_with_key((q, k, v), False, scale, token_major_order)[0]
    raise ValueError("attention_jvp: give all of tq, tk, tv or none of them")


def backward_with_key(
    inputs: tuple,
    key: Optional[tuple],
    o: torch.Tensor,
    t: Optional[torch.Tensor],
    lse2: torch.Tensor,
    mu: Optional[torch.Tensor],
    grad_o: Optional[torch.Tensor],
    grad_t: Optional[torch.Tensor],
    scale: Optional[float],
) -> tuple:
    """Backward on ``inputs`` = (q, k, v[, tq, tk, tv]) (6 with grad_t), given their launch-plan key.

    The caller passes ``key`` = :func:`kernels.launch_plans.input_key` of ``inputs`` (or the key
    :func:`forward_with_key` returned for the same, unmodified tensors). A recorded plan applies when the
    outputs, statistics and upstream gradients are 16-byte aligned and the statistics have the
    accumulation dtype (as when the plan was made).
    """
    has_go = grad_o is not None
    has_gt = grad_t is not None
    dtype = inputs[0].dtype
    stats_dtype = _acc_dtype(dtype)
    # O's layout decides (the forward that made it chose it): gO, gT, and T, are brought into it.
    token_major_order = _layout(o) == _output_layout(o.shape, True)
    o = _in_output_layout(o, dtype, token_major_order)
    grad_o = _in_output_layout(grad_o, dtype, token_major_order) if grad_o is not None else o
    if grad_t is not None:
        assert t is not None and mu is not None  # required with grad_t (attention_jvp_backward)
        t, grad_t = _in_output_layout(t, dtype, token_major_order), _in_output_layout(grad_t, dtype, token_major_order)
    else:
        t, grad_t, mu = o, o, lse2
    if key is not None and (
        not launch_plans.FAST_LAUNCH
        or lse2.dtype != stats_dtype
        or mu.dtype != stats_dtype
        or not launch_plans.aligned(o, t, grad_o, grad_t, lse2, mu)
    ):
        key = None
    one_pass = ONE_PASS_BACKWARD
    plan_key = ("bwd", key, has_go, has_gt, scale, one_pass, token_major_order)
    plan = launch_plans.lookup(plan_key) if key is not None else None
    six, record = (_six(inputs), False) if plan is not None else _validated(inputs, key)
    q = six[0]
    batch, heads, n_ctx, head_dim = q.shape
    dtype_args = _kernel_dtype_args(dtype, head_dim)
    flags = dict(HAS_GO=has_go, HAS_GT=has_gt)
    constexprs = dict(SCALE=default_scale(head_dim) if scale is None else float(scale), **flags, **dtype_args)
    ints = (*q.stride()[:3], *o.stride()[:3], heads, n_ctx)  # o, t, grad_o, grad_t share one layout

    # The first kernel (pass Q, or the one-pass backward's δ kernel), then allocate the rest while it runs.
    delta = _empty((2 if has_gt else 1, batch, heads, n_ctx), stats_dtype, q.device)
    if one_pass:  # gQ, gtQ: sums of atomic adds, in the accumulation dtype
        first_kernel, first_ints = _attention_jvp_bwd_delta_kernel, (*o.stride()[:3], heads, n_ctx)
        first_args: tuple = (o, t, grad_o, grad_t, delta)
        first_constexprs = dict(**flags, **{k: v for k, v in dtype_args.items() if k != "DOT_PRECISION"})
        gq = torch.zeros(q.shape, dtype=stats_dtype, device=q.device)
        gtq = torch.zeros(q.shape, dtype=stats_dtype, device=q.device) if has_gt else gq
    else:
        gq = _empty_like(q)
        gtq = _empty_like(q) if has_gt else gq
        first_kernel, first_ints, first_constexprs = _attention_jvp_bwd_q_kernel, ints, constexprs
        first_args = (*six, o, t, grad_o, grad_t, lse2, mu, delta, gq, gtq)
    if plan is not None:
        plan[0](*first_args)
    else:
        launch_first = launch_plans.launch_and_record(
            first_kernel,
            _grid(n_ctx, batch * heads, "BLOCK_M"),
            first_args,
            first_ints,
            first_constexprs,
            q.get_device(),
            record,
        )
    gk, gv = _empty_like(q), _empty_like(q)
    gtk, gtv = (_empty_like(q), _empty_like(q)) if has_gt else (gk, gv)
    pass_kv = (*six, grad_o, grad_t, lse2, mu, delta, gk, gv, gtk, gtv, gq, gtq)
    if plan is not None:
        plan[1](*pass_kv)
    else:
        launch_kv = launch_plans.launch_and_record(
            _attention_jvp_bwd_kv_fused_q_kernel if one_pass else _attention_jvp_bwd_kv_kernel,
            _grid(n_ctx, batch * heads, "BLOCK_N"),
            pass_kv,
            ints,
            dict(constexprs, FUSE_Q=one_pass),
            q.get_device(),
            record,
        )
        if launch_first is not None and launch_kv is not None:
            launch_plans.record(plan_key, (launch_first, launch_kv))
    if one_pass and dtype != stats_dtype:
        gq = gq.to(dtype)
        gtq = gtq.to(dtype) if has_gt else gq
    if has_gt:
        return gq, gk, gv, gtq, gtk, gtv
    return gq, gk, gv, None, None, None


def attention_jvp_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: Optional[torch.Tensor],
    tk: Optional[torch.Tensor],
    tv: Optional[torch.Tensor],
    o: torch.Tensor,
    t: Optional[torch.Tensor],
    lse2: torch.Tensor,
    mu: Optional[torch.Tensor],
    grad_o: Optional[torch.Tensor],
    grad_t: Optional[torch.Tensor],
    scale: Optional[float] = None,
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]
]:
    """Backward through O and T (docs/attention_jvp.md §3, §4): returns (gQ, gK, gV, gtQ, gtK, gtV).

    ``grad_o`` / ``grad_t`` may be None (treated as zero). Without ``grad_t`` this is the plain
    flash backward and the tangent gradients are None; with ``grad_t`` the tangent inputs, ``t``
    and ``mu`` from :func:`attention_jvp_forward` are required. ``t``, ``grad_o`` and ``grad_t`` in another
    layout than ``o``'s (token-major or contiguous) are copied into it. Gradients are contiguous
    ``[B, H, N, D]`` in the input dtype. Pass Q then pass KV: 18u + 24u FLOPs when both are given;
    with :data:`ONE_PASS_BACKWARD`, the δ kernel then pass KV adding into gQ, gtQ: 30u.
    """
    if grad_o is None and grad_t is None:
        raise ValueError("attention_jvp_backward: at least one of grad_o, grad_t is required")
    if grad_t is not None:
        if tq is None or tk is None or tv is None or t is None or mu is None:
            raise ValueError("attention_jvp_backward: grad_t needs tq, tk, tv, t and mu")
        inputs: tuple[torch.Tensor, ...] = (q, k, v, tq, tk, tv)
    else:
        inputs = (q, k, v)
    return backward_with_key(inputs, launch_plans.input_key(inputs), o, t, lse2, mu, grad_o, grad_t, scale)
