"""The whole training step as one CUDA graph (``training.cuda_graph``).

A TVM step of DiT-XL/2 launches ≈ 8,700 kernels (docs/benchmarks.md, Round 6): on a host that
launches them slower than the GPU runs them, the GPU waits (12.8% of the step on the H100 of
2026-12-06). Captured once and replayed, the whole step (every micro-batch's forward and backward,
the gradient norm, AdamW and both EMA updates) costs the host one launch.

PyTorch's whole-network capture (``torch.cuda.graph``), in three phases:

1. **Warm-up.** The first ``warmup`` steps run as they are, on a side stream. They are real
   training steps; they compile the blocks, autotune the attention kernels and create AdamW's state,
   none of which may happen under capture.
2. **Capture.** The next step's inputs are copied into static buffers, the step function runs once
   under capture (recording its kernels, not running them), then the graph is replayed once: that
   replay is the step.
3. **Replay.** Every later step copies its inputs into the static buffers and replays.

A replay runs the eager step's kernels on the same inputs, so the run's numbers should not change:
``tests/train/test_step_graph.py`` compares a captured run with the eager run bit for bit on a GPU
(green on an H100: docs/benchmarks.md, Round 7, where the DiT-XL/2 step takes 3.5% less time).

What the step must allow (:func:`check_cuda_graph_supported` names each setting that breaks it):
static shapes (every micro-batch has ``batch_gpu`` images), no host synchronisation inside (the
loop has none: non-finite steps are skipped on the device), one process (collectives are not
captured here), no CUDA graphs of its own inside, and Python decisions that do not change after
the capture (the learning rate and the EMA decays are constants).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_map

from tvm.compiling import uses_cuda_graphs

StepOutputs = dict[str, torch.Tensor]


def check_cuda_graph_supported(
    device: torch.device, distributed: bool, sharding: str, compile: bool, compile_mode: str
) -> None:
    """ValueError naming the setting when ``training.cuda_graph`` cannot capture this run's step."""
    if device.type != "cuda":
        raise ValueError(f"training.cuda_graph=true needs a CUDA device; this run trains on {device.type}")
    if distributed or sharding != "ddp":
        raise ValueError(
            "training.cuda_graph=true captures the step of one process: the gradient all-reduce of DDP and "
            "FSDP2's all-gathers are not captured; set training.cuda_graph=false for multi-GPU or sharded runs"
        )
    if compile and uses_cuda_graphs(compile_mode):
        raise ValueError(
            f"training.cuda_graph=true captures the whole step; network.compile_mode={compile_mode} would "
            "capture CUDA graphs of its own inside it: use compile_mode=default (or max-autotune-no-cudagraphs)"
        )


@contextlib.contextmanager
def capturable(optimizers: Sequence[torch.optim.Optimizer]) -> Iterator[None]:
    """Mark the optimizers' parameter groups capturable for the capture only.

    PyTorch refuses to capture ``step()`` of a group not marked so. For fused AdamW the flag changes
    nothing else (its step counts already live on the device); restoring it keeps checkpoints and
    eager steps as they were.
    """
    groups = [group for optimizer in optimizers for group in optimizer.param_groups]
    previous = [group.get("capturable", False) for group in groups]
    for group in groups:
        group["capturable"] = True
    try:
        yield
    finally:
        for group, flag in zip(groups, previous, strict=True):
            group["capturable"] = flag


class StaticInputs:
    """The captured step's input buffers: a copy of the first captured call's inputs (``tree``), into
    which every replay's inputs are copied (:meth:`load`)."""

    def __init__(self, inputs: Any) -> None:
        self.tree = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, inputs)
        self.leaves, self.spec = tree_flatten(self.tree)
        plain = torch.Tensor | bool | int | float | str | None
        opaque = {type(v).__name__ for v in self.leaves if not isinstance(v, plain)}
        if opaque:
            raise TypeError(
                f"StepGraph: the step's inputs hold {sorted(opaque)}, which are not pytree nodes, so their tensors "
                "would not be copied into the graph's buffers: register them (torch.utils._pytree.register_pytree_node)"
            )

    def load(self, inputs: Any) -> None:
        """Copy ``inputs`` into the buffers; ValueError if their structure, a tensor's shape or dtype, or a
        non-tensor value differs from the captured inputs' (checked before anything is copied)."""
        leaves, spec = tree_flatten(inputs)
        is_tensor = [isinstance(leaf, torch.Tensor) for leaf in self.leaves]
        if spec != self.spec or is_tensor != [isinstance(leaf, torch.Tensor) for leaf in leaves]:
            raise ValueError("StepGraph: the step's inputs changed structure after the capture")
        for mine, new in zip(self.leaves, leaves, strict=True):
            if not isinstance(mine, torch.Tensor):
                if new != mine:
                    raise ValueError(f"StepGraph: a non-tensor input changed after the capture: {mine!r} → {new!r}")
            elif (new.shape, new.dtype) != (mine.shape, mine.dtype):
                raise ValueError(
                    f"StepGraph: an input of shape {tuple(new.shape)} {new.dtype} replaces the captured "
                    f"{tuple(mine.shape)} {mine.dtype}; a captured step needs static shapes"
                )
        for mine, new in zip(self.leaves, leaves, strict=True):
            if isinstance(mine, torch.Tensor):
                mine.copy_(new, non_blocking=True)


class StepGraph:
    """Run ``step(inputs) → {name: tensor}`` eagerly ``warmup`` times, then capture it and replay.

    ``inputs`` is a pytree (lists, tuples, dicts, registered dataclasses such as ``StepDraws``) of
    tensors and other values, with the same structure, shapes, dtypes and non-tensor values at every call; the outputs
    are fresh tensors (copies of the graph's static outputs, which the next replay overwrites).
    ``optimizers`` are marked capturable during the capture.
    """

    def __init__(
        self, step: Callable[[Any], StepOutputs], warmup: int = 3, optimizers: Sequence[torch.optim.Optimizer] = ()
    ) -> None:
        if warmup < 1:
            raise ValueError(f"StepGraph needs at least one eager warm-up step, got warmup={warmup}")
        self.step, self.warmup, self.optimizers = step, warmup, tuple(optimizers)
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_inputs: StaticInputs | None = None
        self.static_outputs: StepOutputs = {}
        self._stream: torch.cuda.Stream | None = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, inputs: Any) -> StepOutputs:
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(inputs)
        if self.graph is None:
            self._capture(inputs)
        else:
            assert self.static_inputs is not None
            self.static_inputs.load(inputs)
        assert self.graph is not None
        self.graph.replay()
        return {name: value.clone() for name, value in self.static_outputs.items()}

    def _eager(self, inputs: Any) -> StepOutputs:
        """A warm-up step on the side stream (PyTorch's capture recipe: lazy initialisations such as
        cuBLAS workspaces then belong to the stream the capture uses)."""
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            outputs = self.step(inputs)
        torch.cuda.current_stream().wait_stream(self._stream)
        return outputs

    def _capture(self, inputs: Any) -> None:
        self.static_inputs = StaticInputs(inputs)
        graph = torch.cuda.CUDAGraph()
        torch.cuda.synchronize()
        # the warm-up's blocks are cached for its side stream; the graph allocates from a pool of its own
        torch.cuda.empty_cache()
        try:
            # thread_local: the data loader's pinning thread may call CUDA while this thread captures
            with capturable(self.optimizers), torch.cuda.graph(graph, capture_error_mode="thread_local"):
                outputs = self.step(self.static_inputs.tree)
        except RuntimeError as exc:
            raise RuntimeError(
                f"training.cuda_graph: capturing the training step failed ({exc}). The step must not "
                "synchronise with the host nor change shapes after its warm-up steps; set "
                "training.cuda_graph=false to train without the graph"
            ) from exc
        self.static_outputs, self.graph = outputs, graph
