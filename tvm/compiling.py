"""``torch.compile`` for this package's modules.

Dynamo skips the files of a list of third-party packages by *import name*, and ``"tvm"`` (Apache
TVM) is on it, so without help Dynamo treats every function of this package as untraceable
and runs it eagerly: a compiled model here would silently compile nothing.
:func:`allow_tracing_this_package` takes this package's directory off Dynamo's skip list (once;
a warning where the internals differ); :func:`compile_model` does that, then ``torch.compile``.
Call the former before ``nn.Module.compile()``.
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


def compile_model(fn: Any, **kwargs: Any) -> Any:
    """``torch.compile(fn, **kwargs)`` with this package traceable (see module docstring)."""
    allow_tracing_this_package()
    return torch.compile(fn, **kwargs)
