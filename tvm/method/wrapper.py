"""The trainable network: a DiT plus precision, parametrisation and the loss forward.

``TVMWrapper`` holds the DiT as ``self.model``, so its state dict has the authors' keys
(``model.blocks.0.attn.qkv.weight`` …, docs/method.md §9.3). Its ``forward`` computes the per-sample
loss terms, so that under DDP the JVP, the teacher call and both terms run inside the
DDP-wrapped forward (docs/method.md §5.1 item 13).

Precision (docs/method.md §3.9): ``data_type="bf16"`` (or ``"fp16"``) runs every network call under
CUDA autocast; ``"fp32"`` disables it. On a CPU the wrapper always computes in fp32. Inputs are
cast to the parameters' dtype (fp32) before the network and outputs to the time tensor's dtype (fp32 in training, float64 in
the sampler).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn as nn
import torch.utils.checkpoint

from tvm.method.jvp import velocity_and_ds
from tvm.method.loss import loss_terms
from tvm.method.times import StepDraws, apply_label_dropout
from tvm.models.attention import BACKENDS
from tvm.models.dit import DiT

DATA_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
JVP_MODES = ("explicit", "autograd")
RECOMPUTE = ("none", "fm", "all")


class TVMWrapper(nn.Module):
    """DiT + autocast + scaled parametrisation + the TVM loss forward.

    Args:
        model: the :class:`~tvm.models.dit.DiT`.
        data_type: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (autocast dtype on CUDA).
        do_scale_param: κ = w (the paper's scaled parametrisation) instead of 1.
        detach_jvp: stop the gradient through the tangent ∂_s F (paper's runtime variant).
        attn_backend: attention for plain forwards (``"sdpa"``).
        jvp_attn_backend: attention inside the JVP (``"math"`` reference; ``"triton"`` on GPU).
        jvp_mode: how ``∂_s F`` is computed: ``"explicit"`` tangent propagation through the layers
            (``DiT.forward_with_tangent``; one ordinary graph, compiles) or ``"autograd"``
            (``torch.func.jvp`` through the plain forward, upstream's method; eager only).
        recompute: activation checkpointing, trading compute for memory in training forwards:
            ``"none"``; ``"fm"`` recomputes the flow-matching branch's forward in the backward
            (+1 of the step's ~11 forward equivalents; it keeps fewer bytes but not a lower peak,
            since that branch runs last and so is recomputed first, while the JVP branch's
            activations are all held); ``"all"`` also recomputes each block of the JVP branch
            (explicit mode; +2 more). Values and gradients are unchanged. With compilation,
            ``network.compile_memory_budget`` is the better lever (docs/benchmarks.md).
    """

    def __init__(self, model: DiT, data_type: str = "bf16", do_scale_param: bool = True,
                 detach_jvp: bool = False, attn_backend: str = "sdpa", jvp_attn_backend: str = "math",
                 jvp_mode: str = "explicit", recompute: str = "none"):
        super().__init__()
        if data_type not in DATA_TYPES:
            raise ValueError(f"unknown data_type {data_type!r}; allowed: {', '.join(DATA_TYPES)}")
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"unknown jvp_mode {jvp_mode!r}; allowed: {', '.join(JVP_MODES)}")
        if recompute not in RECOMPUTE:
            raise ValueError(f"unknown recompute {recompute!r}; allowed: {', '.join(RECOMPUTE)}")
        if recompute == "all" and jvp_mode != "explicit":
            raise ValueError("recompute='all' needs jvp_mode='explicit' (torch.func.jvp cannot run through "
                             "activation checkpointing); use recompute='fm'")
        for name, backend in (("attn_backend", attn_backend), ("jvp_attn_backend", jvp_attn_backend)):
            if backend not in BACKENDS:
                raise ValueError(f"unknown {name} {backend!r}; allowed: {', '.join(BACKENDS)}")
        if jvp_attn_backend == "sdpa":
            raise ValueError("jvp_attn_backend='sdpa' is not allowed: PyTorch's fused SDPA kernels have no "
                             "forward-mode rule; use 'math' or 'triton'")
        self.model = model
        self.data_type = data_type
        self.do_scale_param = do_scale_param
        self.detach_jvp = detach_jvp
        self.attn_backend = attn_backend
        self.jvp_attn_backend = jvp_attn_backend
        self.jvp_mode = jvp_mode
        self.recompute = recompute

    @property
    def label_dim(self) -> int:
        return self.model.num_classes

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        """CUDA autocast in ``data_type``; a no-op for fp32 and on the CPU."""
        if device.type != "cuda" or self.data_type == "fp32":
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=DATA_TYPES[self.data_type])

    def velocity(self, x: torch.Tensor, t: torch.Tensor, gap: torch.Tensor, labels: torch.Tensor | None = None,
                 beta: torch.Tensor | None = None, attn_backend: str | None = None,
                 out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``F_θ(x, t, gap, c, β)`` with inputs cast to the parameter dtype (fp32; float64 in
        tests) and the output to ``out_dtype`` (default: t's dtype, as upstream). With gradients
        enabled and ``recompute`` set, its activations are recomputed in the backward."""
        checkpoint = self.recompute != "none" and torch.is_grad_enabled()
        return self._velocity(x, t, gap, labels, beta, attn_backend or self.attn_backend, out_dtype, checkpoint)

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, gap: torch.Tensor, labels: torch.Tensor | None,
                  beta: torch.Tensor | None, attn_backend: str, out_dtype: torch.dtype | None,
                  checkpoint: bool) -> torch.Tensor:
        args = (*self._param_dtype(x, t, gap, labels, beta), attn_backend)
        with self.autocast(x.device):
            if checkpoint:
                out = torch.utils.checkpoint.checkpoint(self.model, *args, use_reentrant=False)
            else:
                out = self.model(*args)
        return out.to(out_dtype or t.dtype)

    def velocity_and_ds(self, x: torch.Tensor, t: torch.Tensor, s: torch.Tensor, labels: torch.Tensor | None,
                        beta: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(F_θ(x, t, t − s, c, β), ∂_s F)`` in t's dtype (docs/method.md §1.3), by ``jvp_mode``.

        Both outputs are differentiable w.r.t. the parameters; the attention is ``jvp_attn_backend``.
        """
        if self.jvp_mode == "autograd":
            return velocity_and_ds(
                lambda s_: self._velocity(x, t, t - s_, labels, beta, self.jvp_attn_backend, None, False), s)
        x_, t_, gap, labels_, beta_ = self._param_dtype(x, t, t - s, labels, beta)
        with self.autocast(x.device):
            F, dF = self.model.forward_with_tangent(
                x_, t_, gap, -torch.ones_like(gap), labels_, beta_, attn_backend=self.jvp_attn_backend,
                recompute_blocks=self.recompute == "all")
        return F.to(t.dtype), dF.to(t.dtype)

    def _param_dtype(self, *tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
        """The network inputs cast to the parameters' dtype (None stays None)."""
        dtype = self.model.pos_embed.dtype
        return [None if x is None else x.to(dtype) for x in tensors]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None, draws: StepDraws,
                teacher: "TVMWrapper") -> dict[str, torch.Tensor]:
        """Per-sample loss terms for a batch (docs/method.md §1.4); label dropout from ``draws``.

        Args:
            x: encoded data ``[B, C, R, R]``; labels one-hot ``[B, K]`` or None.
            draws: this batch's slice of the step's random draws.
            teacher: the target EMA (called without gradient, in eval mode).
        Returns:
            ``{"terminal", "fm", "loss"}``, each ``[B]`` fp32.
        """
        labels, beta = apply_label_dropout(labels, draws.beta, draws.drop)
        return loss_terms(self, teacher, x, draws.noise, draws.t, draws.s, draws.s_prime, labels, beta)
