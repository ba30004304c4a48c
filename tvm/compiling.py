"""``torch.compile`` for this package's modules.

Dynamo skips the files of a list of third-party packages by *import name*, and ``"tvm"`` (Apache
TVM) is on it, so without help Dynamo treats every function of this package as untraceable
and runs it eagerly: a compiled model here would silently compile nothing.
:func:`allow_tracing_this_package` takes this package's directory off Dynamo's skip list (once;
a warning where the internals differ); :func:`compile_model` does that, then ``torch.compile``.
Call the former before ``nn.Module.compile()``.

:func:`compile_training` is the training run's compile policy (``network.compile*``: scope, mode,
memory budget, static shapes). :func:`set_activation_memory_budget` sets how much of its activations a
compiled graph keeps for the backward (``network.compile_memory_budget``).

:func:`save_compile_cache` / :func:`load_compile_cache` keep the compiled artifacts (Inductor's
kernels and graphs, AOTAutograd's joint graphs, Triton binaries: PyTorch's "mega-cache") in a file
of the run directory, so that a restarted job — a preempted Slurm job requeued on another node,
whose local Inductor cache is empty — skips most of the compilation (``network.compile_cache``).
With it, :func:`use_kernel_cache` keeps our Triton attention kernels' binaries and autotuning
results in the run directory too (``triton-cache/``), which the mega-cache does not hold.
The file holds pickled compiled code, like Inductor's own cache directory: it is trusted as the
run directory's other contents are (a run only loads the cache it wrote itself).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

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
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = _checked_budget(budget, "network.compile_memory_budget")


def _checked_budget(budget: float, key: str) -> float:
    """``budget`` as a float; ValueError naming ``key`` outside [0, 1]."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"{key} must be in [0, 1], got {budget}")
    return float(budget)


def memory_budget_scope(budget: float | None) -> contextlib.AbstractContextManager:
    """Graphs compiled inside this context keep ``budget`` of their activations
    (:func:`set_activation_memory_budget`); None keeps the process-wide setting. Graphs compiled
    earlier keep theirs: the budget is read when a graph is compiled (its first call)."""
    if budget is None:
        return contextlib.nullcontext()
    import torch._functorch.config as functorch_config

    return functorch_config.patch(activation_memory_budget=_checked_budget(budget, "network.compile_memory_budget_fm"))


# torch.compile modes that run the compiled graphs as CUDA graphs, each with its equivalent without them.
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def uses_cuda_graphs(mode: str) -> bool:
    """Whether ``torch.compile`` mode ``mode`` replays CUDA graphs (the caller marks each step's start)."""
    return mode in CUDA_GRAPH_MODES


def compile_options(mode: str, cuda_graphs: bool = True) -> dict[str, str]:
    """``torch.compile`` keyword arguments for ``network.compile_mode``; with ``cuda_graphs=False`` a
    CUDA-graph mode becomes its equivalent without graphs (``max-autotune`` → ``…-no-cudagraphs``)."""
    if not cuda_graphs:
        mode = CUDA_GRAPH_MODES.get(mode, mode)
    return {} if mode == "default" else {"mode": mode}


def compile_model(fn: Any, **kwargs: Any) -> Any:
    """``torch.compile(fn, **kwargs)`` with this package traceable (see module docstring)."""
    allow_tracing_this_package()
    return torch.compile(fn, **kwargs)


def load_compile_cache(path: str | os.PathLike[str]) -> int:
    """Load the artifacts saved by :func:`save_compile_cache` (before anything is compiled).

    Returns how many artifacts were loaded; 0 when the file is absent, or (with a warning) when
    this PyTorch cannot read it — another version wrote it, or it is damaged: a cache is an
    optimisation and never stops a run, the graphs are then compiled from scratch.
    """
    path = Path(path)
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return 0
    try:
        info = torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # noqa: BLE001 - any failure to read a cache means "compile from scratch"
        warnings.warn(f"ignoring the compile cache {path}: {type(exc).__name__}: {exc}")
        return 0
    if info is None:  # PyTorch logged why (damaged file, checksum mismatch)
        warnings.warn(f"ignoring the compile cache {path}: this PyTorch could not read it")
        return 0
    return _artifact_count(info)


def save_compile_cache(path: str | os.PathLike[str]) -> int:
    """Write every artifact compiled in this process so far to ``path`` (atomically: a temporary
    file, then a rename). Returns the number of artifacts written (0: nothing compiled yet, or a
    PyTorch without the mega-cache API; nothing is written then)."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return 0
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return 0
    data, info = saved
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return _artifact_count(info)


def _artifact_count(info: Any) -> int:
    """Number of artifacts in a ``CacheInfo`` (``artifacts``: kind → list of artifact keys)."""
    artifacts = getattr(info, "artifacts", None)
    return sum(len(keys) for keys in artifacts.values()) if isinstance(artifacts, dict) else 0


COMPILE_CACHE = "compile-cache.bin"
KERNEL_CACHE = "triton-cache"  # our Triton kernels' binaries and autotuning results (kernels/launch_plans.py)


def use_kernel_cache(directory: str | os.PathLike[str] | None) -> Path | None:
    """Keep the binaries and autotuning results of this package's Triton attention kernels in
    ``directory`` (None: Triton's own cache, as by default); returns the previous setting, to restore.

    Without Triton there are no such kernels and nothing is set (returns None). Inductor's kernels
    and caches are not affected (kernels/launch_plans.py, "Cache directory").
    """
    try:
        from kernels import launch_plans
    except ImportError:
        return None
    return launch_plans.use_cache_dir(directory)


class _BlockCompiled(Protocol):
    """A DiT: compiles each of its blocks in place."""

    def compile_blocks(self, **options: Any) -> None: ...


class _HoldsModel(Protocol):
    """A TVMWrapper: holds its DiT as ``.model``."""

    @property
    def model(self) -> _BlockCompiled: ...


def compile_training(
    ddp: torch.nn.Module, online: _HoldsModel | None, teacher: _HoldsModel | None, ema: _HoldsModel | None, network: Any
) -> torch.nn.Module:
    """The training forward under ``torch.compile`` (``network.compile_scope``): ``blocks`` compiles
    each DiT block of the online net, the teacher and the eval EMA (TVMWrappers; their ``.model``) in
    place (regional compilation);
    ``full`` compiles the whole DDP-wrapped loss forward. The compiled graphs keep
    ``network.compile_memory_budget`` of their activations for the backward.

    Every input shape gets its own static graph: with Dynamo's automatic dynamic shapes, a call at
    another batch size first (an evaluation at step 0, say) would make the training graphs
    dynamic in the batch, whose partition keeps more for the backward (DiT-XL/2 at budget 0.7:
    41.3 instead of 31.3 GiB, docs/benchmarks.md).
    """
    scope, mode = str(network.compile_scope), str(network.get("compile_mode", "default"))  # checked by the schema
    options = compile_options(mode)
    set_activation_memory_budget(network.compile_memory_budget)
    torch._dynamo.config.automatic_dynamic_shapes = False
    if scope == "full":
        if hasattr(torch._dynamo.config, "optimize_ddp"):  # gone in newer PyTorch, which splits no DDP graph
            torch._dynamo.config.optimize_ddp = False  # one graph for forward and backward, as upstream
        return compile_model(ddp, **options)
    assert online is not None and teacher is not None and ema is not None, "compile_scope=blocks needs the wrappers"
    for wrapper in (online, teacher):
        wrapper.model.compile_blocks(**options)
    # The eval EMA samples in loops that feed a block's output back in; CUDA graph trees overwrite
    # such outputs on the next replay (measured: "accessing tensor output of CUDAGraphs that has been
    # overwritten"), so it never uses CUDA graphs.
    ema.model.compile_blocks(**compile_options(mode, cuda_graphs=False))
    return ddp


def update_compile_cache(path: Path, loaded: int, log: Callable[[str], None]) -> None:
    """Rank 0 writes the artifacts compiled so far when there are more than the file held; a failure
    to write is logged, never fatal (the cache only saves compile time at the next start)."""
    try:
        written = save_compile_cache(path) if not loaded else 0
    except OSError as exc:
        log(f"compile cache not written ({exc}); the next start compiles from scratch")
        return
    log(
        f"compile cache: {loaded} artifacts loaded at start"
        if loaded
        else f"compile cache: {written} artifacts written to {path}; a restart loads them"
    )
