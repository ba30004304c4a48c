"""FP8 (e4m3) GEMMs for sampling: the DiT blocks' linear layers with row-wise scaled operands.

A linear layer ``y = x Wᵀ + b`` (``x`` ``[M, K]``, ``W`` ``[N, K]``) runs as one FP8 GEMM

    y ≈ (s_x ⊙ Q(x / s_x)) (s_w ⊙ Q(W / s_w))ᵀ + b,    s_x[m] = max_k |x[m, k]| / 448,   s_w[n] = max_k |W[n, k]| / 448,

where ``Q`` rounds to float8 e4m3 (3 mantissa bits, largest finite value 448): one scale per row of ``x``
(per token, computed on the fly) and one per row of ``W`` (per output feature, computed once). The GEMM
accumulates in fp32 and applies both scales to its accumulator (``torch._scaled_mm`` with row-wise
scales), so the only errors are the two roundings to e4m3 (relative ≤ 2⁻⁴ per entry; absolute ≤ 2⁻¹⁰·s for
the entries below 2⁻⁶·s, e4m3's subnormal range) and the bf16 rounding of the output. On an H100 the FP8
tensor cores run twice the bf16 rate.

Sampling only: there is no backward (the training step never uses it), and the rounding changes the
samples, so measure its FID (``bash eval.sh ... eval.fp8=true``) before relying on it. The fp32 weights
stay in the module (state dicts are unchanged), and loading a state dict re-quantizes them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from tvm.models.attention import autocast_dtype

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value
SCALE_FLOOR = 1e-12  # smallest row maximum: an all-zero row gets a finite scale and quantizes to zeros


def check_fp8_device(device: torch.device) -> None:
    """ValueError unless ``device`` runs FP8 GEMMs: a CPU, or a GPU of compute capability ≥ 8.9 (Ada, Hopper
    and later; an A100 has no FP8 tensor cores)."""
    if device.type != "cuda":
        return
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(
            f"FP8 GEMMs need a GPU of compute capability 8.9 or higher (L40, RTX 4090, H100 and later); "
            f"{torch.cuda.get_device_name(device)} is {major}.{minor}"
        )


def rowwise_quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q(x / s), s)`` for ``x`` ``[M, K]``: ``s`` ``[M, 1]`` fp32 = each row's max |x| / 448 (floored at
    :data:`SCALE_FLOOR` / 448), ``Q`` the rounding to float8 e4m3fn, so each row's largest entry maps to ±448."""
    x = x.float()
    scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=SCALE_FLOOR) / E4M3_MAX
    # x / s can exceed 448 by a rounding of the division; e4m3fn has no infinity (out of range casts give NaN)
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn), scale


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose forward is one row-wise scaled FP8 GEMM (module docstring), for sampling.

    Keeps ``weight`` and ``bias`` (fp32 parameters, the state dict of the layer it replaces) and their
    quantized form in non-persistent buffers: ``weight_fp8`` ``[N, K]`` e4m3 and ``weight_scale`` ``[1, N]``
    fp32, refreshed by :meth:`quantize_weight` (called on construction and after ``load_state_dict``).
    Output dtype: the autocast dtype when autocast is on, else the input's.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.register_buffer("weight_fp8", torch.empty(0), persistent=False)
        self.register_buffer("weight_scale", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.quantize_weight())
        self.quantize_weight()

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Fp8Linear:
        """An FP8 layer sharing ``linear``'s parameters (the same tensors) on ``linear``'s device."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta")
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        layer.quantize_weight()
        return layer

    @torch.no_grad()
    def quantize_weight(self) -> None:
        """Re-quantize ``weight`` into ``weight_fp8`` and ``weight_scale`` (after changing the weights)."""
        if self.weight.is_meta:
            return
        weight_fp8, scale = rowwise_quantize(self.weight)
        self.weight_fp8, self.weight_scale = weight_fp8, scale.reshape(1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` → ``[..., N]``. Raises under gradient mode: the FP8 GEMM has no backward."""
        if torch.is_grad_enabled():
            raise RuntimeError(
                "an FP8 linear layer is for sampling only (no backward); run it under torch.no_grad() "
                "or torch.inference_mode(), and never quantize a network that trains"
            )
        out_dtype = autocast_dtype(x.device.type) or x.dtype
        x_fp8, x_scale = rowwise_quantize(x.reshape(-1, self.in_features))
        y = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
        )
        y = y.to(out_dtype)
        if self.bias is not None:
            y = y + self.bias.to(out_dtype)
        return y.view(*x.shape[:-1], self.out_features)
