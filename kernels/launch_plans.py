"""Launch plans: the host-side fast path of the attention-JVP launchers (:mod:`kernels.attention_jvp`).

A launch through Triton's autotuner and JIT costs tens of µs of host time (autotuner key,
argument binding and specialisation, cache lookup, launch metadata): more than the GPU time of
a small attention call. So the first call with a given input signature goes through them (they
pick the config and compile), and the launcher records the compiled kernel, its grid and its
trailing arguments (integers and constexpr values) in a plan. Later calls with the same
signature launch the compiled kernel directly through ``CompiledKernel.run``, with the
argument list that ``JITFunction.run`` and ``CompiledKernel.__getitem__`` pass it (the same in
Triton 3.6 to 3.9). A Triton whose internals do not have the expected layout gets no plan: that
signature stays on the dispatch path, which is always correct.

A plan's key holds everything the JIT specialises on: shape and strides (all the kernels'
integer arguments derive from them), dtype, device, flags and scale, and it is made only when
every pointer the caller passes is 16-byte aligned (Triton specialises on that); outputs are
fresh allocations, so their alignment and layout follow from the key.

Interface used by the launchers: :func:`input_key` (the signature of a call, or None when no plan
applies), :func:`lookup` / :func:`record` (the plan cache), :func:`launch_and_record` (a launch
through the autotuner and the JIT that returns a :class:`Launch` for later calls) and
:func:`aligned`. Set ``TVM_ATTENTION_FAST_LAUNCH=0`` in the environment, or ``FAST_LAUNCH =
False`` on this module at run time (:func:`fast_launch` for a block of code), to always take the
dispatch path.

Cache directory: :func:`use_cache_dir` makes every launch through the autotuner and the JIT run with
Triton's cache directory (``triton.knobs.cache.dir``, i.e. ``TRITON_CACHE_DIR``) set to the given
directory and with the kernel's autotuner storing its results there (``Autotuner.cache_results``,
read at each tuning in Triton 3.6 to 3.9): the compiled binaries and the chosen configs (one
``<kernel>.autotune.json`` per tuning key, keyed on Triton's version, the GPU target, the kernel
source and the candidate configs) outlive the node, and a later process finds them instead of
compiling and benchmarking again. The setting is process-wide during such a launch
(``knobs.cache.scope()`` restores the previous directory and environment after it); Inductor's
kernels, compiled and loaded outside our launches, keep their own directory. Several ranks and nodes
may share the directory: Triton writes each file into a temporary folder of its own (pid and random
id) and moves it into place with ``os.replace``, so a reader sees a whole file or none, and two
writers of one key write the same binary. Two ranks tuning one key at once may choose different
configs; the last file written wins and every later process reads that one. A kernel's group file
records its files' absolute paths: a node that mounts the directory elsewhere compiles again.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import torch
import triton

FAST_LAUNCH = os.environ.get("TVM_ATTENTION_FAST_LAUNCH", "1") != "0"

_PLANS: dict[tuple, tuple[Launch, ...]] = {}
_CACHE_DIR: Optional[Path] = None  # use_cache_dir
try:  # launch hooks (profilers) and the cache directory live here since Triton 3.4; without it no plans are made
    from triton import knobs as _triton_knobs

    _RUNTIME_KNOBS, _CACHE_KNOBS = _triton_knobs.runtime, _triton_knobs.cache
except (ImportError, AttributeError):
    _RUNTIME_KNOBS = _CACHE_KNOBS = None

# What reading an unexpected layout of Triton's internals raises while a plan is made.
_INTERNALS_ERRORS = (AttributeError, KeyError, IndexError, TypeError)


def is_interpreting() -> bool:
    """True when Triton kernels run on the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _hook_set(hook: Any) -> bool:
    """Whether a Triton launch hook would do anything (since 3.6 an empty HookChain by default)."""
    return hook is not None and bool(getattr(hook, "calls", True))


class Launch:
    """A compiled kernel with its grid and trailing arguments; ``self(*pointers)`` launches it.

    The kernel's full argument list is ``(*pointers, *tail)``: the pointer arguments come first in
    every kernel of :mod:`kernels.attention_jvp`, then the integers and the constexpr values
    (``tail``). Under the interpreter the same argument list goes to the interpreted function.
    """

    __slots__ = ("grid", "tail", "compiled", "launcher", "function", "packed", "device", "stream", "interpreted")

    def __init__(self, grid: tuple[int, int, int], tail: tuple, compiled: Any, device: int, interpreted: Any) -> None:
        self.grid, self.tail, self.compiled, self.device, self.interpreted = grid, tail, compiled, device, interpreted
        if interpreted is None:
            self.launcher = compiled.run
            self.function = compiled.function
            self.packed = compiled.packed_metadata
            self.stream = triton.runtime.driver.active.get_current_stream

    def __call__(self, *pointers: Any) -> None:
        if self.interpreted is not None:
            self.interpreted[self.grid](*pointers, *self.tail)
            return
        grid = self.grid
        stream = self.stream(self.device)
        enter, leave = _RUNTIME_KNOBS.launch_enter_hook, _RUNTIME_KNOBS.launch_exit_hook
        if _hook_set(enter) or _hook_set(leave):  # e.g. a profiler: same metadata as the JIT path
            args = (*pointers, *self.tail)
            metadata = self.compiled.launch_metadata(grid, stream, *args)
            self.launcher(*grid, stream, self.function, self.packed, metadata, enter, leave, *args)
        else:
            self.launcher(
                grid[0], grid[1], grid[2], stream, self.function, self.packed, None, None, None, *pointers, *self.tail
            )


def _plan_from(
    kernel: Any, grid_fn: Callable, meta: dict[str, Any], compiled: Any, pointers: tuple, ints: tuple, device: int
) -> Optional[Launch]:
    """The :class:`Launch` of the call that just ran with arguments ``meta`` (None if Triton's
    objects do not look as expected; reading them may then raise one of ``_INTERNALS_ERRORS``)."""
    names = list(kernel.arg_names)  # signature order
    if len(names) != len(meta) or len(names) <= len(pointers) + len(ints):
        return None
    launch_grid = tuple(grid_fn(meta))
    launch_grid = launch_grid + (1,) * (3 - len(launch_grid))
    tail = (*ints, *(meta[name] for name in names[len(pointers) + len(ints) :]))
    if is_interpreting():
        return Launch(launch_grid, tail, None, device, kernel.fn)
    if _RUNTIME_KNOBS is None:
        return None
    if hasattr(compiled, "result"):
        compiled = compiled.result()
    if getattr(compiled, "function", None) is None or not hasattr(compiled, "packed_metadata"):
        return None
    return Launch(launch_grid, tail, compiled, device, None)


def launch_and_record(
    kernel: Any,
    grid_fn: Callable[[dict[str, Any]], tuple[int, ...]],
    pointers: tuple,
    ints: tuple,
    constexprs: dict[str, Any],
    device: int,
    record: bool,
) -> Optional[Launch]:
    """Launch ``kernel[grid_fn](*pointers, *ints, **constexprs)`` through the autotuner and the JIT;
    with ``record``, return a :class:`Launch` that repeats it for later calls with the same key
    (None when no plan can be made: the caller then stays on this dispatch path)."""
    bound: list[dict[str, Any]] = []

    def grid(meta: dict[str, Any]) -> tuple[int, ...]:
        bound.append(meta)  # all arguments by name, the config's meta-parameters included
        return grid_fn(meta)

    with _in_cache_dir(kernel):
        compiled = kernel[grid](*pointers, *ints, **constexprs)
    if not record or not bound:
        return None
    try:
        return _plan_from(kernel, grid_fn, bound[-1], compiled, pointers, ints, device)  # the last launch ran
    except _INTERNALS_ERRORS:  # an unknown Triton internals layout: stay on the dispatch path
        return None


def use_cache_dir(directory: Optional[str | os.PathLike[str]]) -> Optional[Path]:
    """Compile our kernels into, and keep their autotuning results in, ``directory`` from now on (None:
    Triton's own cache directory and no stored tuning, the default); returns the previous directory.
    See "Cache directory" in the module docstring."""
    global _CACHE_DIR
    if directory is not None and _CACHE_KNOBS is None:
        warnings.warn(
            f"this Triton has no triton.knobs (Triton 3.4 or newer has): the attention kernels are not cached in "
            f"{directory} but in Triton's default cache directory",
            stacklevel=2,
        )
    previous, _CACHE_DIR = _CACHE_DIR, None if directory is None else Path(directory)
    return previous


def cache_dir() -> Optional[Path]:
    """The directory set by :func:`use_cache_dir` (None: Triton's own)."""
    return _CACHE_DIR


@contextlib.contextmanager
def _in_cache_dir(kernel: Any) -> Iterator[None]:
    """A launch of ``kernel`` (an autotuner) with Triton's cache in :func:`cache_dir` and the autotuner
    storing its results there; unchanged when no directory is set (or under the interpreter, which
    compiles nothing and whose autotuners never store)."""
    if _CACHE_DIR is None or _CACHE_KNOBS is None or is_interpreting():
        yield
        return
    stores = getattr(kernel, "cache_results", None)  # None: not an autotuner (one config, nothing to tune)
    with _CACHE_KNOBS.scope():
        _CACHE_KNOBS.dir = str(_CACHE_DIR)
        if stores is not None:
            kernel.cache_results = True
        try:
            yield
        finally:
            if stores is not None:
                kernel.cache_results = stores


def input_key(tensors: tuple) -> Optional[tuple]:
    """(shape, strides, dtype, device) shared by all tensors, or None (no plan for this call).

    None when plans are off (``FAST_LAUNCH``), when layouts, dtypes or devices differ, when a
    pointer is not 16-byte aligned, when the tensors are on the CPU outside the interpreter, or
    for non-tensors (the launcher's validation then raises).
    """
    if not FAST_LAUNCH:
        return None
    first = tensors[0]
    try:
        shape, stride, dtype, device = first.shape, first.stride(), first.dtype, first.get_device()
        pointers = first.data_ptr()
        for x in tensors[1:]:
            if x.shape != shape or x.stride() != stride or x.dtype != dtype or x.get_device() != device:
                return None
            pointers |= x.data_ptr()
    except (AttributeError, TypeError, RuntimeError):
        return None
    if pointers & 15:
        return None
    if device < 0:
        if not is_interpreting():
            return None
    elif torch.cuda.current_device() != device:
        return None
    return shape, stride, dtype, device


def aligned(*tensors: torch.Tensor) -> bool:
    """Whether every tensor's data pointer is 16-byte aligned (what a plan's kernels were built for)."""
    pointers = 0
    for x in tensors:
        pointers |= x.data_ptr()
    return not pointers & 15


def lookup(key: tuple) -> Optional[tuple[Launch, ...]]:
    """The launches recorded under ``key`` (in launch order), or None."""
    return _PLANS.get(key)


def record(key: tuple, launches: tuple[Launch, ...]) -> None:
    """Remember ``launches`` (one per kernel of the call, in launch order) for ``key``."""
    _PLANS[key] = launches


def recorded() -> dict[tuple, tuple[Launch, ...]]:
    """A copy of the plan cache (benchmarks and tests read it)."""
    return dict(_PLANS)


def clear() -> None:
    """Forget every plan (the next call of each signature goes through the autotuner and the JIT)."""
    _PLANS.clear()


@contextlib.contextmanager
def fast_launch(enabled: bool) -> Iterator[None]:
    """Run a block with plans on or off (``FAST_LAUNCH``), restoring the previous setting after it."""
    global FAST_LAUNCH
    previous, FAST_LAUNCH = FAST_LAUNCH, bool(enabled)
    try:
        yield
    finally:
        FAST_LAUNCH = previous
