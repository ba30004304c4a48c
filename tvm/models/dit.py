"""DiT with TVM's "semi-Lipschitz" changes (docs/method.md §3).

Changes from the original DiT: RMSNorm without affine instead of LayerNorm, QK-norm, RMS
normalisation of every adaLN modulation chunk ("mod-norm", gates included), spectral
initialisation of the linear layers, and two extra timestep embedders: one for the gap t − s
(called ``s_embedder`` for compatibility with the authors' state dicts) and one for the
guidance β = 1/w.

Parameter names and shapes equal the authors' DiT (docs/method.md §9.3), so their state dicts load
with ``strict=True``. Forward semantics equal theirs: ``F(x, t, gap, labels, β)`` with one-hot
labels whose all-zero rows mean the null class. ``DiT.forward`` takes the five inputs as the authors'
DiT does; inside the package they travel as one :class:`FlowMapInput`.

Every module also has ``forward_with_tangent``, which carries a tangent along (each layer maps
``(x, ẋ)`` to ``(y, ẏ)``, rules in :mod:`tvm.models.tangent`): ``DiT.forward_with_tangent`` gives
F and ``∂F/∂gap·ġap`` in one ordinary graph, the fast replacement for ``torch.func.jvp``.

Shapes: ``B`` batch, ``C`` channels, ``R`` resolution, ``p`` patch, ``G = R/p``, ``T = G²``
tokens, ``D`` hidden size, ``H`` heads, ``d = D/H`` head dim.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple, cast

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from tvm.models import tangent
from tvm.models.attention import attention, attention_with_tangent, autocast_dtype
from tvm.models.fp8 import Fp8Linear, check_fp8_device
from tvm.models.init import initialize_dit

RMS_EPS = 1e-6
FREQ_DIM = 256  # sinusoidal feature size of every timestep embedder (docs/method.md §3.2)
TOKEN_LINEARS = ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")  # a block's linear layers applied to every token
GELU_EPILOGUE_NOT_FP8 = "the GELU epilogue is a bf16 GEMM: it cannot be combined with FP8 linear layers"


@dataclass(frozen=True)
class Variant:
    """Width, depth and heads of a DiT variant (docs/method.md §3.7)."""

    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2


VARIANTS: dict[str, Variant] = {
    "DiT-XL/2-18h": Variant(hidden_size=1152, depth=28, num_heads=18),
    "DiT-XL/2": Variant(hidden_size=1152, depth=28, num_heads=16),
    "DiT-L/2": Variant(hidden_size=1024, depth=24, num_heads=16),
    "DiT-B/2": Variant(hidden_size=768, depth=12, num_heads=12),
    "DiT-S/2": Variant(hidden_size=384, depth=12, num_heads=6),
}
# The authors' class names (configs' ``network.model_type``) map to the same entries.
VARIANT_ALIASES: dict[str, str] = {
    "DiT_XL_2_18h": "DiT-XL/2-18h",
    "DiT_XL_2": "DiT-XL/2",
    "DiT_L_2": "DiT-L/2",
    "DiT_B_2": "DiT-B/2",
    "DiT_S_2": "DiT-S/2",
}


def resolve_variant(name: str) -> Variant:
    """Look a variant up by our name or the authors' class name; ValueError if unknown."""
    key = VARIANT_ALIASES.get(name, name)
    if key not in VARIANTS:
        allowed = sorted(VARIANTS) + sorted(VARIANT_ALIASES)
        raise ValueError(f"unknown model variant {name!r}; allowed: {', '.join(allowed)}")
    return VARIANTS[key]


# ------------------------------------------------------------------------------------------
# Pure helpers


def timestep_features(tau: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal features of raw scalars τ (docs/method.md §3.2, §12 item 7).

    ``[cos(τ f_k), sin(τ f_k)]_{k<dim/2}`` with ``f_k = exp(−ln(max_period)·k/(dim/2))``,
    computed in float64 and cast to τ's dtype. τ is not rescaled (t, gap, β ∈ [0, 1]).

    Args:
        tau: ``[B]``.
    Returns:
        ``[B, dim]``.
    """
    return _sinusoids(tau, dim, max_period, derivative=False).to(tau.dtype)


def timestep_features_derivative(tau: torch.Tensor, dim: int = FREQ_DIM, max_period: float = 10000.0) -> torch.Tensor:
    """``d/dτ`` of :func:`timestep_features`: ``[−f_k sin(τ f_k), f_k cos(τ f_k)]``, float64 ``[B, dim]``."""
    return _sinusoids(tau, dim, max_period, derivative=True)


def _sinusoids(tau: torch.Tensor, dim: int, max_period: float, derivative: bool) -> torch.Tensor:
    """Float64 ``[cos(τf), sin(τf)]`` or its τ-derivative ``[−f sin(τf), f cos(τf)]``, zero-padded to odd dim."""
    half = dim // 2
    k = torch.arange(half, dtype=torch.float64, device=tau.device)
    freqs = torch.exp(-math.log(max_period) * k / half)
    args = tau.to(torch.float64)[:, None] * freqs[None]
    if derivative:
        feats = torch.cat([-freqs * torch.sin(args), freqs * torch.cos(args)], dim=-1)
    else:
        feats = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        feats = torch.cat([feats, torch.zeros_like(feats[:, :1])], dim=-1)
    return feats


def sincos_pos_embed_2d(hidden_size: int, grid_size: int) -> np.ndarray:
    """Fixed 2-D sin-cos positional embedding, float64 ``[G², D]`` (docs/method.md §3.3, §12 item 6).

    For the token at row i, column j (row-major index ``i·G + j``) the first D/2 channels encode
    the column j and the last D/2 the row i; each half is ``[sin(pos·ω), cos(pos·ω)]`` with
    ``ω_k = 10000^{−k/(D/4)}``.
    """
    if hidden_size % 4:
        raise ValueError(f"hidden size {hidden_size} must be divisible by 4 for the 2-D sin-cos embedding")
    quarter = hidden_size // 4
    omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
    rows, cols = np.meshgrid(
        np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64), indexing="ij"
    )

    def encode(pos: np.ndarray) -> np.ndarray:
        args = pos.reshape(-1)[:, None] * omega[None]
        return np.concatenate([np.sin(args), np.cos(args)], axis=1)

    return np.concatenate([encode(cols), encode(rows)], axis=1)


def rms_normalize(x: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """``x · rsqrt(mean(x²) + eps)`` over the last dim, no affine (the mod-norm, docs/method.md §3.4).

    Written with elementary ops so that autocast runs the square and rsqrt in fp32 and the
    product promotes to fp32, as upstream's dtype flow does (docs/method.md §3.9).
    """
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation ``x·(1 + scale) + shift``; x ``[B, T, D]``, shift/scale ``[B, D]``."""
    return x * (1 + scale[:, None]) + shift[:, None]


def label_indices(labels: torch.Tensor) -> torch.Tensor:
    """Class index of one-hot rows; all-zero rows map to the null class (docs/method.md §3.1 step 1).

    ``argmax([c, 1 − Σc])`` over ``label_dim + 1`` columns: one-hot class k → k, zeros → label_dim.
    Args:
        labels: ``[B, label_dim]`` float.
    Returns:
        ``[B]`` int64.
    """
    null = 1 - labels.sum(dim=1, keepdim=True)
    return torch.cat([labels, null], dim=1).argmax(dim=1)


def _broadcast_batch(v: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Flatten a time/guidance tensor to ``[B]``, repeating a leading-1 tensor (docs/method.md §3.1 step 3)."""
    v = v.reshape(-1) if v.dim() != 1 else v
    if v.shape[0] == 1 and batch != 1:
        v = v.expand(batch)
    if v.shape[0] != batch:
        raise ValueError(f"{name} has {v.shape[0]} entries; expected 1 or the batch size {batch}")
    return v


# ------------------------------------------------------------------------------------------
# Modules (names follow the authors' state dict, docs/method.md §9.3)


class TimestepEmbedder(nn.Module):
    """Scalar → ``[B, D]``: sin-cos features then ``Linear(256→D) → SiLU → Linear(D→D)``."""

    def __init__(self, hidden_size: int, freq_dim: int = FREQ_DIM):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, tau: torch.Tensor) -> torch.Tensor:
        return self.mlp(timestep_features(tau, self.freq_dim))

    def forward_with_tangent(self, tau: torch.Tensor, dtau: torch.Tensor) -> tangent.Pair:
        """Features' tangent ``[−f·sin(τf), f·cos(τf)]·τ̇`` (float64, like the features), then the MLP."""
        feats = timestep_features(tau, self.freq_dim)
        dfeats = timestep_features_derivative(tau, self.freq_dim) * dtau.to(torch.float64)[:, None]
        fc1, _, fc2 = cast("tuple[nn.Linear, nn.SiLU, nn.Linear]", self.mlp)  # unpacks as this tuple
        h, dh = tangent.silu(*tangent.linear(feats, dfeats.to(tau.dtype), fc1.weight, fc1.bias))
        return tangent.linear(h, dh, fc2.weight, fc2.bias)


class LabelEmbedder(nn.Module):
    """Class table with ``num_classes + 1`` rows; the last row is the null class."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(label_indices(labels))


class PatchEmbed(nn.Module):
    """``[B, C, R, R]`` → ``[B, T, D]`` by a stride-p convolution, tokens in row-major order."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"resolution {img_size} is not divisible by the patch size {patch_size}")
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def linear_with_tangent(layer: nn.Linear, x: torch.Tensor, dx: torch.Tensor) -> tangent.Pair:
    """:func:`tvm.models.tangent.linear` through ``layer``'s own GEMMs: an FP8 layer's
    (:meth:`Fp8Linear.forward_with_tangent`), else the plain rule with its weight and bias."""
    if isinstance(layer, Fp8Linear):
        return layer.forward_with_tangent(x, dx)
    return tangent.linear(x, dx, layer.weight, layer.bias)


class Attention(nn.Module):
    """Multi-head self-attention with QK-norm (docs/method.md §3.5)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=RMS_EPS) if qk_norm else nn.Identity()
        self.k_norm = nn.RMSNorm(self.head_dim, eps=RMS_EPS) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, backend: str) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        out = attention(self.q_norm(q), self.k_norm(k), v, backend)  # [B, H, T, d]
        return self.proj(out.transpose(1, 2).reshape(B, T, D))

    def _qk_norm(self, norm: nn.Module, x: torch.Tensor, dx: torch.Tensor) -> tangent.Pair:
        if isinstance(norm, nn.Identity):
            return x, dx
        assert isinstance(norm, nn.RMSNorm) and norm.eps is not None  # built with eps=RMS_EPS
        return tangent.rms_norm(x, dx, norm.eps, norm.weight)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor, backend: str) -> tangent.Pair:
        B, T, D = x.shape
        heads = (B, T, 3, self.num_heads, self.head_dim)
        qkv, dqkv = linear_with_tangent(self.qkv, x, dx)
        q, k, v = qkv.reshape(heads).permute(2, 0, 3, 1, 4)
        dq, dk, dv = dqkv.reshape(heads).permute(2, 0, 3, 1, 4)
        query, key = self._qk_norm(self.q_norm, q, dq), self._qk_norm(self.k_norm, k, dk)
        out, dout = attention_with_tangent(query, key, (v, dv), backend)  # [B, H, T, d] each
        merge = lambda a: a.transpose(1, 2).reshape(B, T, D)  # noqa: E731
        return linear_with_tangent(self.proj, merge(out), merge(dout))


def linear_gelu_tanh(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``GELU_tanh(x Wᵀ + b)`` as one cuBLASLt GEMM with the bias and the GELU in its epilogue.

    ``x`` ``[..., D_in]`` on a CUDA device, ``weight`` ``[D_out, D_in]``, ``bias`` ``[D_out]``; computed in
    the CUDA autocast dtype when autocast is on, else in ``x``'s dtype. Returns ``[..., D_out]``.
    The GELU acts on the fp32 accumulator, so the pre-activation is rounded once (at the output)
    instead of twice, as ``F.gelu(F.linear(...))`` in bf16 does. No autograd (PyTorch defines no
    derivative for ``aten._addmm_activation``) and CUDA only: on a CPU that op's GELU is the erf form.
    """
    dtype = autocast_dtype("cuda") or x.dtype
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._addmm_activation(bias.to(dtype), flat, weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])


class Mlp(nn.Module):
    """``fc1 (D→4D) → GELU(tanh) → dropout → fc2 (4D→D) → dropout``.

    ``gelu_epilogue`` (off by default; :meth:`DiT.fuse_gelu_epilogue`): on a CUDA device without
    gradients, ``fc1`` and the GELU run as one GEMM (:func:`linear_gelu_tanh`), which saves a pass
    over the ``[B, T, 4D]`` activations; the result differs from the unfused one by the bf16
    rounding of the pre-activation. The training step never uses it (its teacher call runs without
    gradients too, so the flag belongs only on networks that sample).
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.dropout = dropout
        self.gelu_epilogue = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gelu_epilogue and x.is_cuda and not torch.is_grad_enabled():
            h = linear_gelu_tanh(x, self.fc1.weight, self.fc1.bias)
        else:
            h = F.gelu(self.fc1(x), approximate="tanh")
        h = F.dropout(h, self.dropout, self.training)
        return F.dropout(self.fc2(h), self.dropout, self.training)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> tangent.Pair:
        h, dh = tangent.gelu_tanh(*linear_with_tangent(self.fc1, x, dx))
        h, dh = tangent.dropout(h, dh, self.dropout, self.training)
        y, dy = linear_with_tangent(self.fc2, h, dh)
        return tangent.dropout(y, dy, self.dropout, self.training)


class DiTBlock(nn.Module):
    """One DiT block with mod-norm'd adaLN (docs/method.md §3.4, eq. M9; the paper's Eq. 16 change)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        mod_norm: bool = True,
        dropout: float = 0.0,
    ):
        super().__init__()
        self.mod_norm = mod_norm
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), dropout)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        c: torch.Tensor,
        attn_backend: str,
        dx: torch.Tensor | None = None,
        dc: torch.Tensor | None = None,
    ) -> torch.Tensor | tangent.Pair:
        """The block; with tangents ``dx``, ``dc`` given, :meth:`forward_with_tangent` (one entry
        point, so that ``block.compile()`` compiles both)."""
        if dx is not None:
            assert dc is not None, "dx and dc are given together"
            return self.forward_with_tangent(x, dx, c, dc, attn_backend)
        m = self.adaLN_modulation(c).unflatten(-1, (6, -1))  # [B, 6, D]
        if self.mod_norm:
            m = rms_normalize(m)
        shift1, scale1, gate1, shift2, scale2, gate2 = m.unbind(1)
        D = x.shape[-1]
        x = x + gate1[:, None] * self.attn(modulate(F.rms_norm(x, (D,), eps=RMS_EPS), shift1, scale1), attn_backend)
        x = x + gate2[:, None] * self.mlp(modulate(F.rms_norm(x, (D,), eps=RMS_EPS), shift2, scale2))
        return x

    def forward_with_tangent(
        self, x: torch.Tensor, dx: torch.Tensor, c: torch.Tensor, dc: torch.Tensor, attn_backend: str
    ) -> tangent.Pair:
        m = modulation_with_tangent(self.adaLN_modulation, c, dc, 6, self.mod_norm)
        shift1, scale1, gate1, shift2, scale2, gate2 = m
        h = tangent.modulate(*tangent.rms_norm(x, dx, RMS_EPS), shift1, scale1)
        x, dx = tangent.gated_residual(x, dx, gate1, self.attn.forward_with_tangent(*h, attn_backend))
        h = tangent.modulate(*tangent.rms_norm(x, dx, RMS_EPS), shift2, scale2)
        return tangent.gated_residual(x, dx, gate2, self.mlp.forward_with_tangent(*h))


def modulation_with_tangent(
    ada_ln: nn.Sequential, c: torch.Tensor, dc: torch.Tensor, chunks: int, mod_norm: bool
) -> list[tangent.Pair]:
    """The adaLN chunks ``[(m_i, ṁ_i)]``, each ``[B, D]``: SiLU → Linear, then mod-norm per chunk."""
    _, lin = cast("tuple[nn.SiLU, nn.Linear]", ada_ln)  # unpacks as this tuple
    m, dm = tangent.linear(*tangent.silu(c, dc), lin.weight, lin.bias)
    m, dm = m.unflatten(-1, (chunks, -1)), dm.unflatten(-1, (chunks, -1))
    if mod_norm:
        m, dm = tangent.rms_normalize(m, dm, RMS_EPS)
    return list(zip(m.unbind(1), dm.unbind(1)))


class FinalLayer(nn.Module):
    """Mod-norm'd adaLN, RMSNorm, then ``Linear(D → p·p·C)`` (docs/method.md §3.6)."""

    def __init__(self, dim: int, patch_size: int, out_channels: int, mod_norm: bool = True):
        super().__init__()
        self.mod_norm = mod_norm
        self.linear = nn.Linear(dim, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        m = self.adaLN_modulation(c).unflatten(-1, (2, -1))
        if self.mod_norm:
            m = rms_normalize(m)
        shift, scale = m.unbind(1)
        return self.linear(modulate(F.rms_norm(x, (x.shape[-1],), eps=RMS_EPS), shift, scale))

    def forward_with_tangent(
        self, x: torch.Tensor, dx: torch.Tensor, c: torch.Tensor, dc: torch.Tensor
    ) -> tangent.Pair:
        shift, scale = modulation_with_tangent(self.adaLN_modulation, c, dc, 2, self.mod_norm)
        h, dh = tangent.modulate(*tangent.rms_norm(x, dx, RMS_EPS), shift, scale)
        return tangent.linear(h, dh, self.linear.weight, self.linear.bias)


class FlowMapInput(NamedTuple):
    """The inputs of ``F_θ(x, t, t − s, c, β)`` (docs/method.md §3.1), one argument of every network call.

    A NamedTuple is a pytree, so activation checkpointing, ``torch.compile`` and FSDP2's forward
    hooks carry its tensors through as they would carry separate arguments.

    Fields:
        x: ``[B, C, R, R]``.
        t: start time, ``[B]``, ``[1]`` or ``[B, 1, 1, 1]``.
        gap: ``t − s``, same shapes as t.
        labels: one-hot ``[B, num_classes]`` (or ``[1, num_classes]``, broadcast); all-zero
            rows (and None) mean the null class.
        guidance: β = 1/w, same shapes as t; None skips the guidance embedding.
    """

    x: torch.Tensor
    t: torch.Tensor
    gap: torch.Tensor
    labels: torch.Tensor | None = None
    guidance: torch.Tensor | None = None

    def with_dtype(self, dtype: torch.dtype) -> FlowMapInput:
        """The same inputs cast to ``dtype`` (None stays None)."""
        labels, guidance = (None if v is None else v.to(dtype) for v in (self.labels, self.guidance))
        return FlowMapInput(self.x.to(dtype), self.t.to(dtype), self.gap.to(dtype), labels, guidance)


class DiT(nn.Module):
    """The two-time, guidance-conditioned DiT ``F_θ(x, t, t − s, c, β)`` (docs/method.md §3).

    Args:
        variant: a key of :data:`VARIANTS` or an authors' class name (e.g. ``"DiT_XL_2_18h"``).
        input_size: latent (or pixel) resolution R.
        in_channels: C.
        num_classes: label width; 0 makes an unconditional model (its table holds only the null row).
        mlp_ratio, qk_norm, mod_norm, learn_guidance, dropout: architecture switches; the
            defaults are what upstream always runs (docs/method.md §3.8).
        init_type: ``"spectral"`` (default) or ``"xunif"``.
        time_specinit: spectral init of the timestep embedders (paper Table 6; inert upstream).
        patch_spectral: divide the patch-embed weight by its top singular value (upstream's
            intent, lost to an aliasing bug; docs/method.md §11 item 2). Default off = upstream result.
        init: run the initialisation (skip on the meta device or before loading weights).
    """

    def __init__(
        self,
        variant: str = "DiT-XL/2-18h",
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        *,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        mod_norm: bool = True,
        learn_guidance: bool = True,
        dropout: float = 0.0,
        init_type: str = "spectral",
        time_specinit: bool = False,
        patch_spectral: bool = False,
        init: bool = True,
        hidden_size: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        patch_size: int | None = None,
    ):
        super().__init__()
        spec = resolve_variant(variant)
        D = hidden_size or spec.hidden_size
        self.depth = depth or spec.depth
        self.num_heads = num_heads or spec.num_heads
        self.patch_size = p = patch_size or spec.patch_size
        self.variant = variant
        self.input_size = input_size
        self.in_channels = self.out_channels = in_channels
        self.num_classes = num_classes
        self.hidden_size = D
        self.learn_guidance = learn_guidance
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        # Registration order = upstream's (it fixes the RNG consumption of default inits).
        self.s_embedder = TimestepEmbedder(D)
        if learn_guidance:
            self.guidance_embedder = TimestepEmbedder(D)
        self.x_embedder = PatchEmbed(input_size, p, in_channels, D)
        self.t_embedder = TimestepEmbedder(D)
        self.y_embedder = LabelEmbedder(num_classes, D)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, D), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                DiTBlock(D, self.num_heads, mlp_ratio, qk_norm=qk_norm, mod_norm=mod_norm, dropout=dropout)
                for _ in range(self.depth)
            ]
        )
        self.final_layer = FinalLayer(D, p, in_channels, mod_norm=mod_norm)
        if init:
            initialize_dit(self, init_type=init_type, time_specinit=time_specinit, patch_spectral=patch_spectral)

    def forward_flops(self) -> float:
        """FLOPs of one forward per image: 2 per multiply-add of the token-wise layers (patch embed,
        qkv, proj, fc1, fc2, final linear) times the tokens, plus attention's 4·T²·D per block.
        Per-image layers (embedders, adaLN) are negligible and left out. DiT-XL/2 at 256 px: 236.8 GFLOP."""
        T = self.x_embedder.num_patches
        token_params = self.x_embedder.proj.weight.numel() + self.final_layer.linear.weight.numel()
        for block in cast("Iterable[DiTBlock]", self.blocks):  # an nn.ModuleList types its items as Module
            token_params += sum(cast(nn.Linear, block.get_submodule(name)).weight.numel() for name in TOKEN_LINEARS)
        return 2 * token_params * T + 4 * T * T * self.hidden_size * len(self.blocks)

    def fuse_gelu_epilogue(self, enabled: bool = True) -> None:
        """Run each block's ``fc1`` + GELU as one GEMM when sampling on a GPU (:class:`Mlp`); call
        before compiling. Only for a network that samples, never for one that trains."""
        if enabled and self.fp8:
            raise ValueError(GELU_EPILOGUE_NOT_FP8)
        for block in cast("Iterable[DiTBlock]", self.blocks):
            block.mlp.gelu_epilogue = enabled

    @property
    def fp8(self) -> bool:
        """Whether the blocks' linear layers run as FP8 GEMMs (:meth:`quantize_fp8`)."""
        return any(isinstance(module, Fp8Linear) for module in self.blocks.modules())

    def quantize_fp8(self, static_weight: bool = True) -> None:
        """Run each block's ``qkv``, ``proj``, ``fc1`` and ``fc2`` as row-wise scaled FP8 GEMMs
        (:mod:`tvm.models.fp8`; 96% of the forward FLOPs of DiT-XL/2 at 256 px); the state dict is unchanged.
        ``static_weight`` (sampling): the weights are quantized once and the layers raise under gradient mode;
        call after loading the weights (a later ``load_state_dict`` re-quantizes). Otherwise (training,
        ``network.fp8``): quantized at every call, with FP8 gradient GEMMs. Call before compiling."""
        if any(block.mlp.gelu_epilogue for block in cast("Iterable[DiTBlock]", self.blocks)):
            raise ValueError(GELU_EPILOGUE_NOT_FP8)
        check_fp8_device(self.pos_embed.device)
        for block in cast("Iterable[DiTBlock]", self.blocks):
            for name in TOKEN_LINEARS:
                layer = cast(nn.Linear, block.get_submodule(name))
                if not isinstance(layer, Fp8Linear) or layer.static_weight != static_weight:
                    block.set_submodule(name, Fp8Linear.from_linear(layer, static_weight))

    def compile_blocks(self, **kwargs) -> None:
        """``torch.compile`` each block in place (regional compilation: one compiled graph per
        path, reused by all blocks; the state dict is unchanged). ``kwargs`` go to ``compile``."""
        from tvm.compiling import allow_tracing_this_package

        allow_tracing_this_package()
        for block in self.blocks:
            block.compile(**kwargs)

    def unpatchify(self, y: torch.Tensor) -> torch.Tensor:
        """``[B, T, p·p·C]`` with last-dim order (p_row, p_col, C) → ``[B, C, R, R]`` (docs/method.md §3.6)."""
        B = y.shape[0]
        p, C = self.patch_size, self.out_channels
        G = self.input_size // p
        y = y.reshape(B, G, G, p, p, C).permute(0, 5, 1, 3, 2, 4)
        return y.reshape(B, C, G * p, G * p)

    def check_inputs(self, inputs: FlowMapInput) -> None:
        """ValueError naming the problem for a wrong input shape, dtype or label width."""
        x, labels = inputs.x, inputs.labels
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.dim() != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x has shape {tuple(x.shape)}; expected [B, {expected[0]}, {expected[1]}, {expected[2]}]")
        if not x.is_floating_point():
            raise ValueError(f"x has dtype {x.dtype}; expected a floating-point tensor")
        if labels is not None:
            if labels.dim() != 2 or labels.shape[1] != self.num_classes:
                raise ValueError(
                    f"labels have shape {tuple(labels.shape)}; expected [B or 1, {self.num_classes}] "
                    "(one-hot rows; all-zero rows mean the null class)"
                )
            if labels.shape[0] not in (1, x.shape[0]):
                raise ValueError(f"labels have {labels.shape[0]} rows for a batch of {x.shape[0]}")

    def _embed(self, inputs: FlowMapInput, gap_embedding: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens ``h`` ``[B, T, D]`` and conditioning ``c`` ``[B, D]`` (docs/method.md §3.1 steps 1–3)
        from checked inputs and the gap's embedding ``[B, D]``."""
        x, t, _, labels, guidance = inputs
        B = x.shape[0]
        if labels is None:
            labels = x.new_zeros(1, self.num_classes)
        if labels.shape[0] == 1 and B != 1:
            labels = labels.expand(B, -1)
        # Contiguous tokens: the patch embedding's transpose would give the first block other strides than the rest,
        # so compiled blocks would compile a second graph for it, and Inductor on the CPU (torch 2.13) computes wrong
        # gradients through the pair (tests/models/test_dit.py::test_compiled_blocks_have_eager_gradients). The sum
        # takes the layout of its first operand, the contiguous position embedding, so it is written contiguous in one
        # pass instead of transposed and then copied.
        h = self.pos_embed + self.x_embedder(x)
        c = self.t_embedder(_broadcast_batch(t, B, "t")) + gap_embedding
        if self.learn_guidance and guidance is not None:
            c = c + self.guidance_embedder(_broadcast_batch(guidance, B, "guidance"))
        return h, c + self.y_embedder(labels)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        gap: torch.Tensor,
        labels: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attn_backend: str = "sdpa",
    ) -> torch.Tensor:
        """``F_θ(x, t, t − s, c, β)`` (docs/method.md §3.1), called as the authors' DiT is.

        Args:
            x, t, gap, labels, guidance: the fields of :class:`FlowMapInput`, with their shapes
                (``TVMWrapper.velocity`` passes one as ``model(*inputs, attn_backend)``).
            attn_backend: see :mod:`tvm.models.attention`.
        Returns:
            ``[B, C, R, R]`` in the compute dtype.
        """
        inputs = FlowMapInput(x, t, gap, labels, guidance)
        self.check_inputs(inputs)
        h, c = self._embed(inputs, self.s_embedder(_broadcast_batch(gap, x.shape[0], "gap")))
        for block in self.blocks:
            h = block(h, c, attn_backend)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_tangent(
        self,
        inputs: FlowMapInput,
        gap_tangent: torch.Tensor,
        attn_backend: str = "math",
        recompute_blocks: bool = False,
    ) -> tangent.Pair:
        """``(F, Ḟ)`` with ``Ḟ = ∂F/∂gap · ġap``: the JVP along the gap alone (x, t, c, β fixed).

        Same inputs as :meth:`forward`, plus ``gap_tangent`` (shapes as gap; −1 gives ``∂_s F``
        for gap = t − s). ``attn_backend`` must compute a tangent: ``"math"`` or ``"triton"``.
        F equals :meth:`forward`'s output; both outputs are differentiable w.r.t. the parameters.
        ``recompute_blocks``: keep only each block's inputs and recompute its activations in the
        backward (activation checkpointing; same values and gradients).
        """
        self.check_inputs(inputs)
        B = inputs.x.shape[0]
        c_gap, dc = self.s_embedder.forward_with_tangent(
            _broadcast_batch(inputs.gap, B, "gap"), _broadcast_batch(gap_tangent, B, "gap_tangent")
        )
        h, c = self._embed(inputs, c_gap)
        dh = torch.zeros_like(h)
        for block in self.blocks:
            if recompute_blocks and torch.is_grad_enabled():
                h, dh = torch.utils.checkpoint.checkpoint(block, h, c, attn_backend, dh, dc, use_reentrant=False)
            else:
                h, dh = block(h, c, attn_backend, dh, dc)
        out, dout = self.final_layer.forward_with_tangent(h, dh, c, dc)
        return self.unpatchify(out), self.unpatchify(dout)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts; total includes the frozen ``pos_embed``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable
