"""``torch.compile`` for this package's modules.

Dynamo skips the files of a list of third-party packages by *import name*, and ``"tvm"`` (Apache
TVM) is on it, so without help Dynamo treats every function of this package as untraceable
and runs it eagerly: a compiled model here would silently compile nothing.
:func:`allow_tracing_this_package` takes this package's directory off Dynamo's skip list (once;
a warning where the internals differ); :func:`compile_model` does that, then ``torch.compile``.
Call the former before ``nn.Module.compile()``.

:func:`set_activation_memory_budget` sets how much of its activations a compiled graph keeps for
the backward (``network.compile_memory_budget``).
"""
from __future__ import annotations

import functools
import os
import warnings
from typing import Any

import torch


@functools.cache
def allow_tracing_this_package() -> bool:
    """Remove ``tvm/`` from Dynamo's skip directories; True if it was there and is gone."""
    try:
        from torch._dynamo import trace_rules
        skip_dirs, recompile = trace_rules.SKIP_DIRS, trace_rules._recompile_re
    except (ImportError, AttributeError):
        warnings.warn("torch._dynamo's skip list has an unknown layout: torch.compile may skip the tvm package")
        return False
    ours = os.path.dirname(os.path.abspath(__file__)).replace(os.sep, "/").rstrip("/") + "/"
    kept = [d for d in skip_dirs if d.rstrip("/") + "/" != ours]
    removed = len(kept) != len(skip_dirs)
    skip_dirs[:] = kept
    recompile()
    return removed


def set_activation_memory_budget(budget: float) -> None:
    """Fraction of the activations each compiled forward keeps for its backward (process-wide).

    1.0 is PyTorch's default min-cut partition; below it the partitioner recomputes, in the
    backward, the ops that are cheapest by FLOP count (pointwise and normalisation chains first,
    matrix products last) until the saved bytes fit ``budget`` × the default's; 0 recomputes
    everything. Values and gradients are unchanged. Read when a graph is compiled (its first call),
    so set it before that.
    """
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"network.compile_memory_budget must be in [0, 1], got {budget}")
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = float(budget)


def compile_model(fn: Any, **kwargs: Any) -> Any:
    """``torch.compile(fn, **kwargs)`` with this package traceable (see module docstring)."""
    allow_tracing_this_package()
    return torch.compile(fn, **kwargs)
