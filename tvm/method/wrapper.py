"""The trainable network: a DiT plus its precision; ``forward`` delegates to the objective.

``TVMWrapper`` holds the DiT as ``self.model``, so its state dict has the authors' keys
(``model.blocks.0.attn.qkv.weight`` …, docs/method.md §9.3). Its ``forward`` is the per-sample loss
(:func:`tvm.method.objective.tvm_loss`) or one of its terms (``phase``), so that under DDP the JVP,
the teacher call and both terms run inside the DDP-wrapped forward (docs/method.md §5.1 item 13).
The objective's options given with the network in the config (``do_scale_param``, ``detach_jvp``,
``jvp_mode``) are stored here and read by the objective and the sampler.

Precision (docs/method.md §3.9): ``data_type="bf16"`` (or ``"fp16"``) runs every network call under
CUDA autocast; ``"fp32"`` disables it. On a CPU the wrapper always computes in fp32. Inputs are
cast to the parameters' dtype (fp32) before the network and outputs to the time tensor's dtype
(fp32 in training, float64 in the sampler).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
import torch.nn as nn
import torch.utils.checkpoint

from tvm.method.objective import flow_matching_term, terminal_term, tvm_loss
from tvm.models.attention import BACKENDS
from tvm.models.dit import DiT, FlowMapInput

DATA_TYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
JVP_MODES = ("explicit", "autograd")
RECOMPUTE = ("none", "fm", "all")


class TVMWrapper(nn.Module):
    """DiT + autocast (+ activation recomputation); ``forward`` = the TVM loss.

    Args:
        model: the :class:`~tvm.models.dit.DiT`.
        data_type: ``"bf16"``, ``"fp16"`` or ``"fp32"`` (autocast dtype on CUDA).
        do_scale_param: κ = w (the paper's scaled parametrisation) instead of 1.
        detach_jvp: stop the gradient through the tangent ∂_s F (paper's runtime variant).
        attn_backend: attention for plain forwards (``"sdpa"``).
        jvp_attn_backend: attention inside the JVP (``"math"`` reference; ``"triton"`` on GPU).
        jvp_mode: how the objective computes ``∂_s F``: ``"explicit"`` tangent propagation through
            the layers (:meth:`velocity_with_tangent`) or ``"autograd"`` (``torch.func.jvp`` through
            :meth:`velocity`, upstream's method; eager only); see ``objective.velocity_and_ds``.
        recompute: activation checkpointing, trading compute for memory in training forwards:
            ``"none"``; ``"fm"`` recomputes the flow-matching branch's forward in the backward
            (+1 of the step's ~11 forward equivalents; it keeps fewer bytes but not a lower peak,
            since that branch runs last and so is recomputed first, while the JVP branch's
            activations are all held); ``"all"`` also recomputes each block of the JVP branch
            (explicit mode; +2 more). Values and gradients are unchanged. With compilation,
            ``network.compile_memory_budget`` is the better lever (docs/benchmarks.md).
    """

    def __init__(
        self,
        model: DiT,
        data_type: str = "bf16",
        do_scale_param: bool = True,
        detach_jvp: bool = False,
        attn_backend: str = "sdpa",
        jvp_attn_backend: str = "math",
        jvp_mode: str = "explicit",
        recompute: str = "none",
    ):
        super().__init__()
        if data_type not in DATA_TYPES:
            raise ValueError(f"unknown data_type {data_type!r}; allowed: {', '.join(DATA_TYPES)}")
        if jvp_mode not in JVP_MODES:
            raise ValueError(f"unknown jvp_mode {jvp_mode!r}; allowed: {', '.join(JVP_MODES)}")
        if recompute not in RECOMPUTE:
            raise ValueError(f"unknown recompute {recompute!r}; allowed: {', '.join(RECOMPUTE)}")
        if recompute == "all" and jvp_mode != "explicit":
            raise ValueError(
                "recompute='all' needs jvp_mode='explicit' (torch.func.jvp cannot run through "
                "activation checkpointing); use recompute='fm'"
            )
        for name, backend in (("attn_backend", attn_backend), ("jvp_attn_backend", jvp_attn_backend)):
            if backend not in BACKENDS:
                raise ValueError(f"unknown {name} {backend!r}; allowed: {', '.join(BACKENDS)}")
        if jvp_attn_backend == "sdpa":
            raise ValueError(
                "jvp_attn_backend='sdpa' is not allowed: PyTorch's fused SDPA kernels have no "
                "forward-mode rule; use 'math' or 'triton'"
            )
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

    def velocity(
        self,
        inputs: FlowMapInput,
        attn_backend: str | None = None,
        out_dtype: torch.dtype | None = None,
        *,
        recompute: bool = True,
    ) -> torch.Tensor:
        """``F_θ(x, t, gap, c, β)`` with inputs cast to the parameter dtype (fp32; float64 in
        tests) and the output to ``out_dtype`` (default: t's dtype, as upstream). With gradients
        enabled, ``self.recompute`` set and ``recompute`` true (false inside ``torch.func.jvp``, which
        cannot run through checkpointing), its activations are recomputed in the backward.

        FSDP2 registers this method as a forward of the teacher and the eval EMA
        (tvm/train/sharding.py): keep its name.
        """
        args = (*inputs.with_dtype(self._param_dtype), attn_backend or self.attn_backend)
        with self.autocast(inputs.x.device):
            if recompute and self.recompute != "none" and torch.is_grad_enabled():
                out = torch.utils.checkpoint.checkpoint(self.model, *args, use_reentrant=False)
            else:
                out = self.model(*args)
        return out.to(out_dtype or inputs.t.dtype)

    def velocity_with_tangent(self, inputs: FlowMapInput, dgap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``F_θ(x, t, gap, c, β)`` and its tangent for the tangent ``dgap`` on the gap input, both in t's
        dtype, by explicit propagation through the layers (``DiT.forward_with_tangent``) with the
        ``jvp_attn_backend`` attention; ``recompute="all"`` recomputes each block in the backward."""
        with self.autocast(inputs.x.device):
            F, dF = self.model.forward_with_tangent(
                inputs.with_dtype(self._param_dtype),
                dgap.to(self._param_dtype),
                attn_backend=self.jvp_attn_backend,
                recompute_blocks=self.recompute == "all",
            )
        return F.to(inputs.t.dtype), dF.to(inputs.t.dtype)

    @property
    def _param_dtype(self) -> torch.dtype:
        """The parameters' dtype, to which the network inputs are cast."""
        return self.model.pos_embed.dtype

    def forward(self, *inputs: Any, phase: str = "loss") -> dict[str, Any]:
        """The objective (:mod:`tvm.method.objective`), whole or one term at a time:

        * ``phase="loss"``, inputs ``(x, labels, draws, teacher)``: :func:`~tvm.method.objective.tvm_loss`,
          ``{"terminal", "fm", "loss"}``, each ``[B]`` (label dropout from ``draws``; ``teacher`` is the
          target EMA);
        * ``"terminal"``, the same inputs: ``{"terminal": [B], "fm_target": FlowMatchingTarget}``
          (:func:`~tvm.method.objective.terminal_term`);
        * ``"fm"``, input ``(fm_target,)``: ``{"fm": [B]}`` (:func:`~tvm.method.objective.flow_matching_term`).

        Every phase is a forward of this module, so that DDP and FSDP2 see each of them.
        """
        if phase == "fm":
            (target,) = inputs
            return {"fm": flow_matching_term(self, target)}
        if phase not in ("loss", "terminal"):
            raise ValueError(f"unknown phase {phase!r}; allowed: loss, terminal, fm")
        x, labels, draws, teacher = inputs
        if phase == "loss":
            return tvm_loss(self, teacher, x, labels, draws)
        terminal, target = terminal_term(self, teacher, x, labels, draws)
        return {"terminal": terminal, "fm_target": target}
