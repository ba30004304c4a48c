"""The model's single attention entry point, with a backend switch (docs/method.md §3.5, §3.10).

Backends (all take and return ``[B, H, N, D]``):

* ``"math"``   explicit ``softmax(q kᵀ / √D) v`` (``kernels.reference.attention_math``); the
  reference. It works under ``torch.func.jvp`` and double backward on every device, at O(N²)
  memory; under autocast its matmuls run in the autocast dtype and the softmax in fp32.
* ``"sdpa"``   ``torch.nn.functional.scaled_dot_product_attention``: the fast path for calls that
  need no JVP (teacher, flow-matching forward, sampling). PyTorch's fused SDPA kernels have no
  forward-mode rule, so it must not be used inside ``torch.func.jvp``.
* ``"triton"`` the fused Triton attention whose forward-mode rule computes the tangent in the same
  pass and whose backward runs through primal and tangent (``kernels.op.attention_jvp``); CUDA
  only (or the Triton interpreter).

Upstream casts q, k, v to bf16 before its JVP kernel even in fp32 mode; we never do: in fp32
mode everything stays fp32. Under autocast, q and k leave the QK-norm in whatever dtype the
torch version's autocast rule for ``rms_norm`` gives, so the Triton path casts q, k, v to the
autocast dtype (the kernel needs one operand dtype), as docs/method.md §3.9 prescribes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from kernels.reference import attention_math, attention_tangent_math
from tvm.models.tangent import Pair

BACKENDS = ("math", "sdpa", "triton")


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype of ``device_type`` when autocast is on there, else None."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Scaled dot-product attention of ``[B, H, N, D]`` tensors with the default scale 1/√D.

    Args:
        q, k, v: ``[B, H, N, D]``.
        backend: one of :data:`BACKENDS`.
    Returns:
        ``[B, H, N, D]``.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "math":
        return attention_math(q, k, v)
    if backend == "triton":
        from kernels.op import attention_jvp

        return attention_jvp(*_kernel_operands(q, k, v))
    raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")


# The Triton kernels address their inputs with one set of strides and copy them (outside any compiled
# graph, in the forward and again in the backward) when layouts differ: in the DiT, v and its tangent are
# views of the fused qkv output while q and k leave the QK-norm contiguous (docs/benchmarks.md, Round 10:
# 4 of the 6 copies per block, 3.4 ms of the default step on an H100; the other 2, of gO and gT, went with the
# kernels' token-major outputs, Round 12). With this on, the operands are made
# contiguous here instead, where a compiled block fuses the copy and the backward reuses it. Values are
# the same bits either way. On since measured with the other two levers of Rounds 12-13 on an H100 (the step
# 273.7 -> 267.5 ms as one CUDA graph, 295.3 -> 276.8 ms without); bench/step.py's option operands=views is the old way.
CONTIGUOUS_KERNEL_OPERANDS = True


@contextlib.contextmanager
def contiguous_kernel_operands(enabled: bool = True) -> Iterator[None]:
    """Set :data:`CONTIGUOUS_KERNEL_OPERANDS` for a block of code (restored after it; read when a
    compiled block is traced, so a change recompiles)."""
    global CONTIGUOUS_KERNEL_OPERANDS
    previous, CONTIGUOUS_KERNEL_OPERANDS = CONTIGUOUS_KERNEL_OPERANDS, enabled
    try:
        yield
    finally:
        CONTIGUOUS_KERNEL_OPERANDS = previous


def _kernel_operands(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Cast the Triton kernel's operands to one dtype: the autocast dtype, else the first's; with
    :data:`CONTIGUOUS_KERNEL_OPERANDS`, also to contiguous memory (a no-op for those already so)."""
    dtype = autocast_dtype(tensors[0].device.type) or tensors[0].dtype
    if CONTIGUOUS_KERNEL_OPERANDS:
        return [x.to(dtype).contiguous() for x in tensors]
    return [x.to(dtype) for x in tensors]


def attention_with_tangent(query: Pair, key: Pair, value: Pair, backend: str = "math") -> Pair:
    """Attention and its tangent, ``(O, T)``, of the (primal, tangent) pairs ``query = (q, q̇)``,
    ``key = (k, k̇)`` and ``value = (v, v̇)``; all tensors ``[B, H, N, D]``.

    For explicit tangent propagation (``tvm.models.tangent``). Backends: ``"math"``
    (``kernels.reference.attention_tangent_math``, the formula written out) and ``"triton"``
    (the fused op ``kernels.op.attention_with_tangent``, one forward and one backward kernel
    pair for both outputs, traced by ``torch.compile`` without a graph break). SDPA computes no
    tangent and is refused.
    """
    (q, dq), (k, dk), (v, dv) = query, key, value
    if backend == "math":
        return attention_tangent_math(q, k, v, dq, dk, dv)
    if backend == "triton":
        from kernels.op import attention_with_tangent as fused

        return fused(*_kernel_operands(q, k, v, dq, dk, dv))
    allowed = "math, triton"
    raise ValueError(f"attention backend {backend!r} computes no tangent; allowed: {allowed}")
