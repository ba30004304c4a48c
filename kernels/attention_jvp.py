"""Triton kernels: attention with a fused forward-mode tangent and a backward through both outputs.

Math (per batch·head, spec /work/shared/spec/ATTENTION_JVP.md §1), with c the softmax scale:

    S  = c·Q Kᵀ,  P = softmax_row(S),  O = P V
    tS = c·(tQ Kᵀ + Q tKᵀ),  μ = rowsum(P⊙tS),  T = (P⊙(tS − μ)) V + P tV

Forward (§1.3, centred variant; §5.2): one program per block of query rows streams the key
blocks with online softmax and keeps two fp32 ``[BLOCK_M, D]`` accumulators (A for O, B for the
centred T) and the row statistics m, ℓ, ν. It stores O, T and two fp32 statistics per row:
``lse2`` = log₂ Σ_j 2^(S_ij·log₂e) (the log-sum-exp in base 2 of the scaled scores) and μ.

Backward (§1.4, §5.3): two passes, no atomics, deterministic.
* pass Q (query-stationary) writes δP = rowsum(gO⊙O) + rowsum(gT⊙T) and δG = rowsum(gT⊙O),
  then accumulates gQ = c·(gS K + gtS tK) and gtQ = c·gtS K;
* pass KV (key-stationary) accumulates gK = c·(gSᵀQ + gtSᵀtQ), gtK = c·gtSᵀQ,
  gV = PᵀgO + (P⊙(tS − μ))ᵀgT and gtV = PᵀgT,
with gtS = P⊙(gT Vᵀ − δG) and gS = P⊙(gO Vᵀ + gT tVᵀ − δP) + (tS − μ)⊙gtS.
The constexpr flags HAS_GO / HAS_GT select the fused, primal-only (plain flash backward) and
tangent-only variants from the same code.

Tensors are ``[B, H, N, D]``. The inputs of one call are addressed with one set of (b, h, n)
strides (any strides with a unit last stride, e.g. views of a fused qkv buffer; inputs with
differing layouts are copied); outputs, gO and gT are contiguous.
The head dimension is padded to a power of two (≥ 16) with masked loads; N is arbitrary (the
partial last block is masked). 16-bit inputs use fp32 accumulation; fp32 inputs use true fp32
dots (``input_precision="ieee"``); fp64 inputs (interpreter only) run in fp64 throughout.
"""
from __future__ import annotations

import math
import os
from typing import Any, NamedTuple, Optional

import torch
import triton
import triton.language as tl

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# --------------------------------------------------------------------------------------------
# Autotuning spaces (spec §5.2, §5.3), keyed on (N, D, dtype). The interpreter gets one small
# config; on the GPU each space is pruned by head dim and dtype (fp32 and fp64 get one config).
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
_FP32_CONFIG = (32, 32)


def _prune(configs: list[triton.Config], named_args: dict[str, Any], **kwargs: Any) -> list[triton.Config]:
    """Keep the small fp32 tile for 32/64-bit inputs, and tiles of ≤ 64 rows for D_PAD = 128."""
    args = {**named_args, **kwargs}
    if args["Q"].dtype in (torch.float32, torch.float64):
        return [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) == _FP32_CONFIG]
    kept = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != _FP32_CONFIG]
    if args["D_PAD"] > 64:
        kept = [c for c in kept if c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64]
    return kept


def _autotune(configs: list[triton.Config]):
    if is_interpreting():
        return triton.autotune(configs=_INTERPRETER_CONFIGS, key=["N_CTX", "HEAD_DIM"])
    return triton.autotune(configs=configs, key=["N_CTX", "HEAD_DIM"], prune_configs_by={"early_config_prune": _prune})


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
    """Pointer to head pid_bh of a contiguous [B, H, N, HEAD_DIM] tensor (outputs, gO, gT)."""
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
def _load_row_stat(ptr, pid_bh, rows, N_CTX, other):
    return tl.load(ptr + pid_bh.to(tl.int64) * N_CTX + rows, mask=rows < N_CTX, other=other)


@triton.jit
def _store_row_stat(ptr, pid_bh, rows, N_CTX, value):
    tl.store(ptr + pid_bh.to(tl.int64) * N_CTX + rows, value, mask=rows < N_CTX)


# --------------------------------------------------------------------------------------------
# Fused forward (spec §1.3 centred variant, §5.2)
# --------------------------------------------------------------------------------------------


@_autotune(_FWD_CONFIGS)
@triton.jit
def _attention_jvp_fwd_kernel(
    Q, K, V, TQ, TK, TV, O, T, LSE2, MU,
    sb, sh, sn,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_TANGENT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
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
    _store_tile(_contiguous_base(O, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_o * inv_l[:, None])
    _store_row_stat(LSE2, pid_bh, rows, N_CTX, m_i + tl.math.log2(l_i))
    if HAS_TANGENT:
        _store_tile(_contiguous_base(T, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_t * inv_l[:, None])
        _store_row_stat(MU, pid_bh, rows, N_CTX, mean_i)


# --------------------------------------------------------------------------------------------
# Backward pass Q (query-stationary; spec §5.3)
# --------------------------------------------------------------------------------------------


@_autotune(_BWD_Q_CONFIGS)
@triton.jit
def _attention_jvp_bwd_q_kernel(
    Q, K, V, TQ, TK, TV, O, T, GO, GT, LSE2, MU, DELTA_P, DELTA_G, GQ, GTQ,
    sb, sh, sn,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_M), B·H). Writes δP, δG (per row) and gQ, gtQ (gtQ only with HAS_GT)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
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
        o = _load_tile(_contiguous_base(O, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM).to(ACC_DTYPE)
    if HAS_GO:
        go = _load_tile(_contiguous_base(GO, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM)
        delta_p += tl.sum(go.to(ACC_DTYPE) * o, 1)
    if HAS_GT:
        gt = _load_tile(_contiguous_base(GT, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM)
        t = _load_tile(_contiguous_base(T, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM).to(ACC_DTYPE)
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
        _store_tile(_contiguous_base(GTQ, pid_bh, N_CTX, HEAD_DIM), rows, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtq * scale)


# --------------------------------------------------------------------------------------------
# Backward pass KV (key-stationary; spec §5.3)
# --------------------------------------------------------------------------------------------


@_autotune(_BWD_KV_CONFIGS)
@triton.jit
def _attention_jvp_bwd_kv_kernel(
    Q, K, V, TQ, TK, TV, GO, GT, LSE2, MU, DELTA_P, DELTA_G, GK, GV, GTK, GTV,
    sb, sh, sn,
    H, N_CTX,
    SCALE: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, ACC_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
    HAS_GO: tl.constexpr, HAS_GT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """Grid (cdiv(N, BLOCK_N), B·H); loops over query blocks of BLOCK_M rows.

    Writes gK, gV and, with HAS_GT, gtK, gtV. All four gradient tensors share one layout.
    """
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    dims = tl.arange(0, D_PAD)
    q_base = _head_base(Q, pid_bh, H, sb, sh)
    k = _load_tile(_head_base(K, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
    v = _load_tile(_head_base(V, pid_bh, H, sb, sh), cols, dims, sn, N_CTX, HEAD_DIM)
    scale = tl.full([], SCALE, ACC_DTYPE)
    qk_scale = tl.full([], SCALE * LOG2E, ACC_DTYPE)
    acc_gk = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)
    acc_gv = tl.zeros([BLOCK_N, D_PAD], ACC_DTYPE)
    if HAS_GO:
        go_base = _contiguous_base(GO, pid_bh, N_CTX, HEAD_DIM)
    if HAS_GT:
        tq_base = _head_base(TQ, pid_bh, H, sb, sh)
        gt_base = _contiguous_base(GT, pid_bh, N_CTX, HEAD_DIM)
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
            go = _load_tile(go_base, rows, dims, HEAD_DIM, N_CTX, HEAD_DIM)
            acc_gv = tl.dot(p_t.to(go.dtype), go, acc_gv, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if HAS_GT:
            tq = _load_tile(tq_base, rows, dims, sn, N_CTX, HEAD_DIM)
            gt = _load_tile(gt_base, rows, dims, HEAD_DIM, N_CTX, HEAD_DIM)
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

    _store_tile(_contiguous_base(GK, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gk * scale)
    _store_tile(_contiguous_base(GV, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gv)
    if HAS_GT:
        _store_tile(_contiguous_base(GTK, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtk * scale)
        _store_tile(_contiguous_base(GTV, pid_bh, N_CTX, HEAD_DIM), cols, dims, HEAD_DIM, N_CTX, HEAD_DIM, acc_gtv)


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------


class ForwardResult(NamedTuple):
    """Outputs of :func:`attention_jvp_forward` (shapes for inputs ``[B, H, N, D]``).

    ``o``, ``t``: ``[B, H, N, D]`` in the input dtype (``t`` is None without tangents).
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
    """Allocation of every kernel output (tests replace it to poison outputs with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _layout(x: torch.Tensor) -> tuple[int, ...]:
    """Strides that matter for addressing (a dimension of size 1 is never stepped over)."""
    return tuple(stride if size > 1 else 0 for stride, size in zip(x.stride(), x.shape))


def _shared_layout(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The inputs, copied to contiguous memory unless all share one layout with unit last stride.

    The kernels address all inputs of a call with one set of (b, h, n) strides, which keeps the
    launch cheap (few arguments); q, k, v views of one fused qkv buffer share their layout.
    """
    layouts = {_layout(x) for x in tensors}
    if len(layouts) == 1 and tensors[0].stride(-1) == 1:
        return list(tensors)
    return [x.contiguous() for x in tensors]


def _contiguous(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x as a contiguous tensor of dtype (outputs and upstream gradients use this layout)."""
    return x.to(dtype).contiguous()


def _bhn_strides(x: torch.Tensor) -> tuple[int, int, int]:
    return x.stride(0), x.stride(1), x.stride(2)


def check_inputs(names: tuple[str, ...], *tensors: torch.Tensor) -> None:
    """Raise ValueError/TypeError with a clear message for inputs the kernels do not support."""
    ref = tensors[0]
    for name, x in zip(names, tensors):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"attention_jvp: {name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(f"attention_jvp: {name} must have shape [B, H, N, D], got {tuple(x.shape)}")
        if x.shape != ref.shape:
            raise ValueError(
                f"attention_jvp: {name} has shape {tuple(x.shape)} but {names[0]} has {tuple(ref.shape)}"
            )
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


def attention_jvp_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: Optional[torch.Tensor] = None,
    tk: Optional[torch.Tensor] = None,
    tv: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
) -> ForwardResult:
    """Fused forward (spec §1.3): O = softmax(c·QKᵀ)V and, given all three tangents, T.

    All tensors are ``[B, H, N, D]`` of one dtype and device. Without tangents this is a plain
    flash forward (4u FLOPs); with them the fused primal+tangent forward (12u, spec §3.1).
    """
    tangents = (tq, tk, tv)
    has_tangent = all(x is not None for x in tangents)
    if any(x is not None for x in tangents) and not has_tangent:
        raise ValueError("attention_jvp: give all of tq, tk, tv or none of them")
    names = ("q", "k", "v", "tq", "tk", "tv") if has_tangent else ("q", "k", "v")
    inputs = [q, k, v, *tangents] if has_tangent else [q, k, v]
    check_inputs(names, *inputs)
    q, k, v, *rest = _shared_layout(*inputs)
    tq, tk, tv = rest if has_tangent else (q, k, v)
    batch, heads, n_ctx, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else float(scale)

    o = _empty(q.shape, q.dtype, q.device)
    t = _empty(q.shape, q.dtype, q.device) if has_tangent else o
    lse2 = _empty((batch, heads, n_ctx), _acc_dtype(q.dtype), q.device)
    mu = _empty(lse2.shape, lse2.dtype, q.device) if has_tangent else lse2

    def grid(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(n_ctx, meta["BLOCK_M"]), batch * heads

    _attention_jvp_fwd_kernel[grid](
        q, k, v, tq, tk, tv, o, t, lse2, mu,
        *_bhn_strides(q), heads, n_ctx, SCALE=scale,
        HAS_TANGENT=has_tangent, **_kernel_dtype_args(q.dtype, head_dim),
    )
    return ForwardResult(o, t if has_tangent else None, lse2, mu if has_tangent else None)


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Backward through O and T (spec §1.4, §5.3): returns (gQ, gK, gV, gtQ, gtK, gtV).

    ``grad_o`` / ``grad_t`` may be None (treated as zero). Without ``grad_t`` this is the plain
    flash backward and the tangent gradients are None; with ``grad_t`` the tangent inputs, ``t``
    and ``mu`` from :func:`attention_jvp_forward` are required. Gradients are contiguous
    ``[B, H, N, D]`` in the input dtype. Pass Q then pass KV: 18u + 24u FLOPs when both are given.
    """
    if grad_o is None and grad_t is None:
        raise ValueError("attention_jvp_backward: at least one of grad_o, grad_t is required")
    has_go = grad_o is not None
    has_gt = grad_t is not None
    if has_gt and any(x is None for x in (tq, tk, tv, t, mu)):
        raise ValueError("attention_jvp_backward: grad_t needs tq, tk, tv, t and mu")
    if has_gt:
        q, k, v, tq, tk, tv = _shared_layout(q, k, v, tq, tk, tv)
        t, grad_t = _contiguous(t, q.dtype), _contiguous(grad_t, q.dtype)
    else:
        q, k, v = _shared_layout(q, k, v)
        tq, tk, tv, t, grad_t = q, k, v, o, o
    o = _contiguous(o, q.dtype)
    grad_o = _contiguous(grad_o, q.dtype) if has_go else o
    mu = mu if has_gt else lse2
    batch, heads, n_ctx, head_dim = q.shape
    scale = default_scale(head_dim) if scale is None else float(scale)

    delta_p = _empty(lse2.shape, lse2.dtype, q.device)
    delta_g = _empty(lse2.shape, lse2.dtype, q.device) if has_gt else delta_p
    grads = [_empty(q.shape, q.dtype, q.device) for _ in range(6 if has_gt else 3)]
    gq, gk, gv = grads[:3]
    gtq, gtk, gtv = grads[3:] if has_gt else (gq, gk, gv)
    constexprs = dict(HAS_GO=has_go, HAS_GT=has_gt, **_kernel_dtype_args(q.dtype, head_dim))

    def grid_q(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(n_ctx, meta["BLOCK_M"]), batch * heads

    def grid_kv(meta: dict[str, Any]) -> tuple[int, int]:
        return triton.cdiv(n_ctx, meta["BLOCK_N"]), batch * heads

    _attention_jvp_bwd_q_kernel[grid_q](
        q, k, v, tq, tk, tv, o, t, grad_o, grad_t, lse2, mu, delta_p, delta_g, gq, gtq,
        *_bhn_strides(q), heads, n_ctx, SCALE=scale, **constexprs,
    )
    _attention_jvp_bwd_kv_kernel[grid_kv](
        q, k, v, tq, tk, tv, grad_o, grad_t, lse2, mu, delta_p, delta_g, gk, gv, gtk, gtv,
        *_bhn_strides(q), heads, n_ctx, SCALE=scale, **constexprs,
    )
    if has_gt:
        return gq, gk, gv, gtq, gtk, gtv
    return gq, gk, gv, None, None, None
