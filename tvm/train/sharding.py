"""Fully sharded data parallelism (FSDP2) for models that do not fit DDP (``network.sharding=fsdp2``).

With DDP every rank holds the whole training state: fp32 weights, gradients, AdamW's two moments and
the two EMAs (eval and teacher) — 6 copies of the parameters, 16.3 GB for DiT-XL/2 — plus the
activations. ``fsdp2`` shards all of it over the ranks with
``torch.distributed.fsdp.fully_shard`` (one unit per DiT block, the rest of the network in the
root unit): every parameter becomes a ``DTensor`` whose local piece is a ``1/world`` slice of its
rows. A unit's full weights exist only while it runs (all-gathered before its forward and again
before its backward), and gradients are reduce-scattered after every backward (each loss term's,
each accumulation round's: :func:`tvm.train.update.gradient_sync`), so each rank keeps
``6 · parameters / world`` plus one or two units at a time (:func:`state_memory_per_rank`).

How the rest of the run treats sharded modules:

* **Same numbers as DDP.** Both average the gradients over the ranks, the loss scaling of the
  loop is unchanged; AdamW, clipping and the EMA updates are element-wise, so on the local
  slices they compute what DDP computes on the whole tensors (the gradient norm sums the
  slices' squares over the ranks, :func:`gradient_norm`). Tests compare losses and weights with
  DDP over several steps to fp32 tolerance.
* **Explicit tangents only.** The JVP branch calls every block through ``block(x, c, …, dx, dc)``
  (``DiTBlock.forward`` dispatches to the tangent rules), so FSDP2's hooks all-gather and free the
  block's weights as for a plain forward; ``torch.func.jvp`` (``jvp_mode=autograd``) would have to
  run through those hooks and is refused.
* **Teacher and eval EMA sharded too**, with the same layout, so their updates are local. The
  teacher runs inside the loss on every rank; sample grids and metrics use an unsharded copy of
  the eval EMA gathered on every rank for that moment (:func:`gather_module`).
* **Checkpoints in the DDP format.** :func:`full_state_dict` all-gathers each tensor (weights and
  optimizer moments) and keeps the full copy on rank 0 only, so a sharded run writes the same
  file as a DDP run: single-process tools (``generate.py``, ``eval.py``, the converter) load it,
  and a DDP run can resume it (and vice versa). :func:`shard_like` turns loaded full tensors
  back into the local slices.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, TypeGuard, TypeVar

import torch
import torch.nn as nn

from tvm.compiling import compile_options, uses_cuda_graphs

if TYPE_CHECKING:
    from torch.distributed.tensor import DTensor

    from tvm.method.wrapper import TVMWrapper

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a PyTorch without DTensor cannot shard; nothing is a DTensor then
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> TypeGuard[DTensor]:
    """True for a ``DTensor`` (a parameter, gradient or optimizer moment of a sharded module)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a sharded tensor (a view: writing it writes the parameter); others as they are."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_sharding_supported(
    sharding: str,
    jvp_mode: str,
    compile_scope: str,
    compile: bool,
    recompute: str,
    distributed: bool,
    compile_mode: str = "default",
) -> None:
    """ValueError naming the setting for a combination ``fsdp2`` does not support (the values
    themselves are checked by the config schema)."""
    if sharding != "fsdp2":
        return
    if not distributed:
        raise ValueError(
            "network.sharding=fsdp2 needs a process group: launch with `bash train.sh NUM_GPUS ...` "
            "(torchrun) or launch.py, also for one GPU"
        )
    if jvp_mode != "explicit":
        raise ValueError(
            "network.sharding=fsdp2 needs network.jvp_mode=explicit (torch.func.jvp cannot run "
            "through the sharded blocks' hooks)"
        )
    if compile and compile_scope != "blocks":
        raise ValueError(
            "network.sharding=fsdp2 compiles per block only: use network.compile_scope=blocks "
            "(or network.compile=false)"
        )
    if compile and uses_cuda_graphs(compile_mode):
        without = compile_options(compile_mode, cuda_graphs=False).get("mode", "default")
        raise ValueError(
            f"network.sharding=fsdp2 cannot use network.compile_mode={compile_mode} (CUDA graphs "
            f"around the blocks' all-gathers); use compile_mode={without}"
        )
    if recompute != "none":
        raise ValueError(
            "network.sharding=fsdp2 does not support network.recompute; use "
            "network.compile_memory_budget to trade compute for memory"
        )


def shard_network(wrapper: TVMWrapper, reshard_after_forward: bool = True, methods: tuple[str, ...] = ()) -> None:
    """``fully_shard`` each DiT block of ``wrapper.model``, then the wrapper (the root unit: embedders
    and final layer), in place. Every rank must hold the same weights (broadcast them first).

    ``methods``: wrapper methods called from outside its ``forward`` (the teacher's ``velocity``,
    called inside the online network's loss), which must gather the root unit as ``forward`` does.
    """
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    for block in wrapper.model.blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(wrapper, reshard_after_forward=reshard_after_forward)
    for method in methods:
        register_fsdp_forward_method(wrapper, method)


def shard_run(net: TVMWrapper, ema: TVMWrapper, teacher: TVMWrapper) -> None:
    """Shard the online network and both EMAs alike (same units, same layout, so EMA updates are
    local). The EMAs are called through ``velocity`` (inside the loss, for sampling), not ``forward``."""
    shard_network(net)
    for module in (ema, teacher):
        shard_network(module, methods=("velocity",))


def broadcast_parameters_(module: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s parameters and buffers to every rank (what DDP does when it wraps a module)."""
    import torch.distributed as dist

    for tensor in [*module.parameters(), *module.buffers()]:
        dist.broadcast(tensor.data, src=src)


@torch.no_grad()
def gradient_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """Global 2-norm of sharded gradients: the local slices' squared norms summed over the ranks."""
    import torch.distributed as dist

    pieces = [local(g) for g in grads]
    squares = torch.stack(torch._foreach_norm(pieces)).square().sum() if pieces else torch.zeros(())
    dist.all_reduce(squares, op=dist.ReduceOp.SUM)
    return squares.sqrt()


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` laid out as ``like``: a DTensor with ``like``'s mesh and placements (each rank keeps
    its slice of the full tensor, which every rank holds) — or ``full`` on ``like``'s device."""
    if not is_sharded(like):
        return full.to(like.device)
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.to_local().device, like.dtype), like.device_mesh, like.placements)


def full_state_dict(state: Any, keep: bool) -> Any:
    """A (module or optimizer) state dict with every DTensor all-gathered into a full CPU tensor.

    Collective: every rank calls it with its own state, in the same order; the tensors are kept on
    the ranks where ``keep`` is true (rank 0) and None elsewhere, so the others never hold the full
    state."""
    if isinstance(state, torch.Tensor):
        full = state.full_tensor() if is_sharded(state) else state
        return full.detach().cpu() if keep else None
    if isinstance(state, dict):
        return {key: full_state_dict(item, keep) for key, item in state.items()}
    if isinstance(state, list):
        return [full_state_dict(item, keep) for item in state]
    return state


def shard_state_dict(full: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """A full module state dict (from a checkpoint) laid out like ``module``'s, for ``load_state_dict``."""
    own = module.state_dict()
    return {
        key: shard_like(value, own[key]) if key in own and getattr(value, "shape", None) == own[key].shape else value
        for key, value in full.items()
    }


def shard_optimizer_state(full: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A full optimizer state dict laid out like the optimizer's parameters (moments become
    DTensors like their parameter; the step counts stay as they are)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for index, entry in full["state"].items():
        param = params[int(index)]
        state[index] = {
            name: shard_like(value, param) if isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for name, value in entry.items()
        }
    return {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}


def gather_module(sharded: nn.Module, plain: ModuleT) -> ModuleT:
    """``plain`` (an unsharded module of the same architecture) loaded with ``sharded``'s full weights
    on every rank; collective. Used to sample and evaluate with the sharded eval EMA."""
    state = {key: value.full_tensor() if is_sharded(value) else value for key, value in sharded.state_dict().items()}
    plain.load_state_dict(state)
    return plain


def state_memory_per_rank(
    parameters: int, world_size: int, sharding: str, copies: int = 6, bytes_per_value: int = 4
) -> float:
    """Bytes of training state per rank (computed, not measured): fp32 weights, gradients, AdamW's two
    moments and the two EMAs (``copies`` = 6 × the parameters); sharded over the ranks with
    ``fsdp2``. Activations and the one or two all-gathered units are not included."""
    total = copies * parameters * bytes_per_value
    return total / world_size if sharding == "fsdp2" else float(total)
