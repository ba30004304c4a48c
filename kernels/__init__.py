"""Triton attention with a fused forward-mode tangent.

* ``kernels.attention_jvp`` — the Triton kernels and launchers (module);
* ``kernels.op`` — the two faces: ``attention_with_tangent`` (torch.library op, explicit tangents)
  and ``attention_jvp`` (autograd.Function with a jvp rule; import it from ``kernels.op``, since
  ``kernels.attention_jvp`` names the kernel module);
* ``kernels.reference`` — float64-capable math reference.

Nothing is imported here, so that ``kernels.reference`` (the model's math attention) works
without Triton installed; Triton is needed only by ``kernels.attention_jvp`` and ``kernels.op``.
"""
