"""Exponential moving averages of the network: the eval EMA and the teacher (target) EMA.

Both are updated after every optimizer step, eval EMA first (docs/method.md §5.2 items 8–9, §12 item 26):

    p_ema ← lerp(p_net, p_ema, β) = p_net + β·(p_ema − p_net)

over parameters only (the DiT has no buffers), paired in ``parameters()`` order. ``lerp`` with
start = p_net and end = p_ema is upstream's operation, so the values match it bit for bit. When
the step was skipped (non-finite gradients) the weight becomes exactly 1, which leaves the EMA
untouched without a host sync.

:func:`update_emas_` runs both updates of a step: on the devices of :data:`FUSED_EMA_DEVICES` (GPUs) as one
Triton kernel that reads the network once for both EMAs (:mod:`kernels.ema`; 4.6 instead of 7.2 ms per step
for DiT-XL/2 on an H100, docs/benchmarks.md Round 13), elsewhere as two per-tensor passes (:func:`update_ema_`).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator, Sequence

import torch
import torch.nn as nn

from tvm.train.sharding import ModuleT, local

# The device types whose parameters get both EMA updates in one kernel (kernels.ema); () for the per-tensor lerps
# of update_ema_ everywhere. Same values either way (torch.lerp's formula: bit for bit on a GPU,
# tests/kernels/test_ema.py). The CPU runs the kernel only under the Triton interpreter, for tests.
FUSED_EMA_DEVICES: tuple[str, ...] = ("cuda",)


@contextlib.contextmanager
def fused_ema_devices(devices: tuple[str, ...]) -> Iterator[None]:
    """Set :data:`FUSED_EMA_DEVICES` for a block of code (restored after it)."""
    global FUSED_EMA_DEVICES
    previous, FUSED_EMA_DEVICES = FUSED_EMA_DEVICES, devices
    try:
        yield
    finally:
        FUSED_EMA_DEVICES = previous


def make_ema(net: ModuleT) -> ModuleT:
    """An exact copy of ``net`` in eval mode without gradients."""
    return copy.deepcopy(net).eval().requires_grad_(False)


def _local_parameters(module: nn.Module) -> list[torch.Tensor]:
    """This rank's pieces of the module's parameters (FSDP2: the local slices), in order."""
    return [local(p) for p in module.parameters()]


def _ema_parameters(ema: nn.Module, net_params: list[torch.Tensor]) -> list[torch.Tensor]:
    """:func:`_local_parameters` of ``ema``, paired with the network's ``net_params``."""
    ema_params = _local_parameters(ema)
    if len(ema_params) != len(net_params):
        raise ValueError(f"EMA has {len(ema_params)} parameters, the network {len(net_params)}")
    return ema_params


@torch.no_grad()
def update_ema_(ema: nn.Module, net: nn.Module, beta: float, skip: torch.Tensor | None = None) -> None:
    """``p_ema ← lerp(p_net, p_ema, β)`` for every parameter pair; no-op where ``skip`` is true.

    Args:
        ema, net: modules with parameters in the same order and shapes.
        beta: decay β ∈ [0, 1].
        skip: 0-dim bool tensor on the parameters' device, or None.
    """
    net_params = _local_parameters(net)
    _lerp_towards_(_ema_parameters(ema, net_params), net_params, beta, skip)


def _lerp_towards_(
    ema_params: list[torch.Tensor], net_params: list[torch.Tensor], beta: float, skip: torch.Tensor | None
) -> None:
    """:func:`update_ema_` on lists of tensors (per tensor, in a few foreach calls)."""
    if not ema_params:
        return
    # In place: ``ema.lerp_(net, 1 − β)`` gives ``ema + (1 − β)(net − ema)``, bit for bit upstream's
    # ``lerp(net, ema, β) = ema − (ema − net)(1 − β)`` (β ≥ 0.5 branch) when ``1 − β`` is formed in the
    # parameters' dtype as lerp forms it (exact there: Sterbenz), and saves a temporary copy of every
    # parameter and the copy back (tests/train/test_ema.py checks the bits for many β, both dtypes).
    dtype = ema_params[0].dtype
    if beta <= 0.5:  # 1 − β ≥ 0.5 would take lerp's other branch: no in-place form with upstream's rounding
        if skip is None:
            new = torch._foreach_lerp(net_params, ema_params, beta)
        else:
            weight = torch.where(skip, 1.0, beta).to(dtype)
            new = torch._foreach_lerp(net_params, ema_params, [weight] * len(ema_params))
        torch._foreach_copy_(ema_params, new)
        return
    if skip is None:
        complement = float(1 - torch.tensor(beta, dtype=dtype))  # on the CPU: no device sync
        torch._foreach_lerp_(ema_params, net_params, complement)
    else:
        weight = 1 - torch.where(skip, 1.0, beta).to(dtype)  # upstream's weight tensor, complemented
        torch._foreach_lerp_(ema_params, net_params, [weight] * len(ema_params))


@torch.no_grad()
def update_emas_(net: nn.Module, emas: Sequence[tuple[nn.Module, float]], skip: torch.Tensor | None = None) -> None:
    """``p_ema ← lerp(p_net, p_ema, β)`` for each ``(ema, β)`` of ``emas`` in order (one or two: the eval
    EMA, then the teacher's); no-op where ``skip`` is true. On a device of :data:`FUSED_EMA_DEVICES`, the
    parameters :func:`kernels.ema.takes` in one pass over ``net`` for all EMAs; the others (all of them on other
    devices) per tensor, as :func:`update_ema_` does.
    """
    net_params = _local_parameters(net)
    ema_params = [_ema_parameters(ema, net_params) for ema, _ in emas]
    if net_params and net_params[0].device.type in FUSED_EMA_DEVICES and 1 <= len(emas) <= 2:
        from kernels import ema as ema_kernel

        device = net_params[0].device
        keep = torch.zeros((), dtype=torch.bool, device=device) if skip is None else skip
        betas = torch.stack([torch.where(keep, 1.0, beta).float() for _, beta in emas])
        left = ema_kernel.update_emas_(net_params, ema_params, betas)  # the parameters the kernel does not take
        net_params = [net_params[i] for i in left]
        ema_params = [[ema_list[i] for i in left] for ema_list in ema_params]
    for ema_list, (_, beta) in zip(ema_params, emas):
        _lerp_towards_(ema_list, net_params, beta, skip)
