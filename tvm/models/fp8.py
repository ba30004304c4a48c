"""FP8 (e4m3) GEMMs with row-wise scaled operands for the DiT blocks' linear layers: sampling, and training (opt-in).

A linear layer ``y = x Wᵀ + b`` (``x`` ``[M, K]``, ``W`` ``[N, K]``) runs as one FP8 GEMM

    y ≈ (s_x ⊙ Q(x / s_x)) (s_w ⊙ Q(W / s_w))ᵀ + b,    s_x[m] = max_k |x[m, k]| / 448,   s_w[n] = max_k |W[n, k]| / 448,

where ``Q`` rounds to float8 e4m3 (3 mantissa bits, largest finite value 448): one scale per row of ``x``
(per token, computed on the fly) and one per row of ``W`` (per output feature, computed once). The GEMM
accumulates in fp32 and applies both scales to its accumulator (``torch._scaled_mm`` with row-wise
scales), so the only errors are the two roundings to e4m3 (relative ≤ 2⁻⁴ per entry; absolute ≤ 2⁻¹⁰·s for
the entries below 2⁻⁶·s, e4m3's subnormal range) and the bf16 rounding of the output. On an H100 the FP8
tensor cores run twice the bf16 rate.

Sampling (:meth:`Fp8Linear.from_linear`, ``static_weight=True``): the weights are quantized once, there is no
backward, and the rounding changes the samples, so measure its FID (``bash eval.sh ... eval.fp8=true``)
before relying on it. The fp32 weights stay in the module (state dicts are unchanged), and loading a state
dict re-quantizes them.

Training (``static_weight=False``, ``network.fp8=true``): the weights are quantized at every call and all three
GEMMs of a linear layer run in FP8 (:class:`Fp8Matmul`), each operand scaled along the GEMM's reduction axis:

    forward           y  = x Wᵀ      x per token (row),             W per output feature (row)
    input gradient    gx = gy W      gy per token (row),            W per input feature (column)
    weight gradient   gW = gyᵀ x     gy per output feature (column), x per input feature (column)

The gradients are those of the quantized product with the quantization's rounding passed straight through
(each operand treated as exact), i.e. the exact linear map's gradients up to the same e4m3 roundings.
Opt-in: every GEMM operand is rounded to 3 mantissa bits, which changes what the network learns by an
amount measured only at small scale (docs/benchmarks.md, Round 17).
"""

from __future__ import annotations

import functools

import torch
import torch.nn as nn

from tvm.models.attention import autocast_dtype

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value
SCALE_FLOOR = 1e-12  # smallest row maximum: an all-zero row gets a finite scale and quantizes to zeros


@functools.cache
def cpu_takes_rowwise_scales() -> bool:
    """Whether this PyTorch's CPU ``torch._scaled_mm`` takes row-wise scales (torch 2.13 does; 2.11's CPU kernel takes
    one scale per tensor only)."""
    ones = torch.ones(16, 16).to(torch.float8_e4m3fn)
    try:
        torch._scaled_mm(ones, ones.t(), scale_a=torch.ones(16, 1), scale_b=torch.ones(1, 16), out_dtype=torch.bfloat16)
    except RuntimeError:
        return False
    return True


def check_fp8_device(device: torch.device) -> None:
    """ValueError unless ``device`` runs FP8 GEMMs with row-wise scales: a CPU whose PyTorch takes them
    (:func:`cpu_takes_rowwise_scales`), or a GPU of compute capability ≥ 8.9 (Ada, Hopper and later; an A100 has
    no FP8 tensor cores)."""
    if device.type == "cpu" and not cpu_takes_rowwise_scales():
        raise ValueError(
            f"this PyTorch's ({torch.__version__}) CPU torch._scaled_mm takes one scale per tensor only; the FP8 "
            "layers need row-wise scales (torch 2.13 or later on a CPU, or a GPU of compute capability 8.9 or higher)"
        )
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


def fp8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` (``a`` ``[M, K]``, ``b`` ``[K, N]``) as one FP8 GEMM: each row of ``a`` and each column of ``b``
    quantized with its own scale (:func:`rowwise_quantize` along the reduction axis ``K``), accumulated in fp32,
    both scales applied to the accumulator, rounded to bf16. Returns ``[M, N]`` bf16. Any strides: the operands are
    quantized into the layouts the GEMM takes (``a`` row-major, ``b`` column-major)."""
    a_q, a_scale = rowwise_quantize(a)
    b_q, b_scale = rowwise_quantize(b.t())  # [N, K]: b's columns as rows
    return torch._scaled_mm(
        a_q.contiguous(),
        b_q.contiguous().t(),
        scale_a=a_scale,
        scale_b=b_scale.reshape(1, -1),
        out_dtype=torch.bfloat16,
    )


class Fp8Matmul(torch.autograd.Function):
    """``x Wᵀ`` (``x`` ``[M, K]``, ``W`` ``[N, K]``) with its forward and both gradient GEMMs in FP8
    (:func:`fp8_matmul`; the table in the module docstring). Output in ``out_dtype``; the gradients in the
    dtypes of ``x`` and ``W``. Saves ``x`` and ``W`` as given (what a bf16 linear layer saves)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return fp8_matmul(x, weight.t()).to(out_dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x, weight = ctx.saved_tensors
        grad_x = fp8_matmul(grad, weight).to(x.dtype) if ctx.needs_input_grad[0] else None
        grad_weight = fp8_matmul(grad.t(), x).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return grad_x, grad_weight, None


class Fp8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 with row-wise scales (module docstring).

    Keeps ``weight`` and ``bias`` (fp32 parameters, the state dict of the layer it replaces). With
    ``static_weight`` (sampling) their quantized form lives in non-persistent buffers, ``weight_fp8`` ``[N, K]``
    e4m3 and ``weight_scale`` ``[1, N]`` fp32, refreshed by :meth:`quantize_weight` (called on construction and
    after ``load_state_dict``), and the layer raises under gradient mode. Without (training), the weights are
    quantized at every call and gradients flow through :class:`Fp8Matmul`.
    Output dtype: the autocast dtype when autocast is on, else the input's.
    """

    weight_fp8: torch.Tensor
    weight_scale: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        static_weight: bool = True,
    ):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.static_weight = static_weight
        self.register_buffer("weight_fp8", torch.empty(0), persistent=False)
        self.register_buffer("weight_scale", torch.empty(0), persistent=False)
        self.register_load_state_dict_post_hook(lambda module, _: module.quantize_weight())
        self.quantize_weight()

    @classmethod
    def from_linear(cls, linear: nn.Linear, static_weight: bool = True) -> Fp8Linear:
        """An FP8 layer sharing ``linear``'s parameters (the same tensors) on ``linear``'s device;
        ``static_weight``: for sampling (weights quantized once), else for training."""
        layer = cls(
            linear.in_features, linear.out_features, linear.bias is not None, device="meta", static_weight=static_weight
        )
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.train(linear.training)
        layer.quantize_weight()
        return layer

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, static_weight={self.static_weight}"

    @torch.no_grad()
    def quantize_weight(self) -> None:
        """Re-quantize ``weight`` into ``weight_fp8`` and ``weight_scale`` (after changing the weights of a
        static layer; a training layer quantizes at every call and keeps no copy)."""
        if self.weight.is_meta or not self.static_weight:
            return
        weight_fp8, scale = rowwise_quantize(self.weight)
        self.weight_fp8, self.weight_scale = weight_fp8, scale.reshape(1, -1)

    def _gemm(self, x: torch.Tensor) -> torch.Tensor:
        """``x Wᵀ`` for rows ``x`` ``[M, K]`` (:meth:`_rows`), in their dtype (no bias)."""
        if not self.static_weight:
            return Fp8Matmul.apply(x, self.weight, x.dtype)
        if torch.is_grad_enabled():
            raise RuntimeError(
                "an FP8 linear layer for sampling has no backward; run it under torch.no_grad() or "
                "torch.inference_mode(), or build it with static_weight=False (network.fp8=true) to train"
            )
        x_fp8, x_scale = rowwise_quantize(x)
        y = torch._scaled_mm(
            x_fp8, self.weight_fp8.t(), scale_a=x_scale, scale_b=self.weight_scale, out_dtype=torch.bfloat16
        )
        return y.to(x.dtype)

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` as ``[M, K]`` rows in the compute dtype: the autocast dtype when autocast is on (as
        ``nn.Linear`` casts its input; the training GEMM saves these rows for its backward), else ``x``'s."""
        return x.reshape(-1, self.in_features).to(autocast_dtype(x.device.type) or x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[..., K]`` → ``[..., N]``."""
        y = self._add_bias(self._gemm(self._rows(x)))
        return y.view(*x.shape[:-1], self.out_features)

    def forward_with_tangent(self, x: torch.Tensor, dx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x Wᵀ + b, ẋ Wᵀ)`` (:func:`tvm.models.tangent.linear`) as one GEMM over the rows of ``x`` and ``ẋ``
        (``[..., K]`` each): the weights are quantized once, and in training the weight gradient of both is one
        GEMM. Each row keeps its own scale, so the values equal two separate calls'."""
        rows = self._rows(x)
        both = self._gemm(torch.cat([rows, self._rows(dx).to(rows.dtype)]))
        y, dy = both[: rows.shape[0]], both[rows.shape[0] :]
        shape = (*x.shape[:-1], self.out_features)
        return self._add_bias(y).view(shape), dy.view(shape)
