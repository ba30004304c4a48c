"""Triton kernels: fused attention with a forward-mode tangent (see kernels/attention_jvp.py)."""
from kernels.op import attention_jvp, attention_with_tangent
from kernels.reference import attention_jvp_math, attention_math

__all__ = ["attention_jvp", "attention_with_tangent", "attention_jvp_math", "attention_math"]
