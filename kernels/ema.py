"""Both EMA updates of a training step in one pass over the parameters (a Triton kernel).

After every optimizer step the eval EMA and the teacher EMA move towards the network
(docs/method.md §5.2 items 8–9, :mod:`tvm.train.ema`), each parameter as upstream computes it:

    p_ema ← lerp(p_net, p_ema, β) = p_net + β·(p_ema − p_net)        if β < 0.5
                                  = p_ema − (p_ema − p_net)·(1 − β)  otherwise

(``torch.lerp``'s two branches, with ``1 − β`` formed in fp32 and each branch one fused multiply-add, as
PyTorch's CUDA kernel compiles them). The per-tensor updates with a weight on the device (which a
skipped step needs without a host sync) read the network once per EMA, 6 × 4 bytes per parameter for
both; this kernel reads it once for both, 5 × 4 bytes (DiT-XL/2: 13.5 instead of 16.2 GB per step),
in one launch for all parameters. Predicted and measured in docs/benchmarks.md (Round 13).

The kernel walks a table with one row per parameter (the addresses of the network's tensor and of its
one or two EMA tensors, and the element count); program (j, i) updates chunks j, j + P, j + 2P, … of
parameter i. The table is built once per set of tensors (:func:`_plan`, keyed on their addresses) and
stays valid while they live at those addresses, as parameters do (optimizers and ``load_state_dict``
write them in place). The kernel updates the parameters it takes (:func:`takes`: fp32, contiguous, 16-byte
aligned, element counts divisible by 4, on a GPU outside the interpreter); :func:`update_emas_` returns the
others' indices, for the caller to update per tensor.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from kernels.launch_plans import is_interpreting

BLOCK = 64 if is_interpreting() else 2048  # elements per chunk (8 per thread at 8 warps)
PROGRAMS_PER_TENSOR = 4 if is_interpreting() else 64  # P: programs that share one parameter's chunks
_PLANS: dict[tuple, "_Plan"] = {}
_MAX_PLANS = 8  # plans kept (one per set of tensors: a run has one)


@triton.jit
def _lerp(net, ema, beta, one_minus_beta):
    """``torch.lerp(net, ema, β)``, elementwise; β and 1 − β are fp32 scalars."""
    diff = ema - net
    small = tl.fma(diff, beta, net)
    large = tl.fma(-diff, one_minus_beta, ema)
    return tl.where(beta < 0.5, small, large)


@triton.jit
def _ema_update_kernel(TABLE, BETAS, HAS_SECOND: tl.constexpr, BLOCK: tl.constexpr):
    """Grid (P, parameters). TABLE: int64 ``[parameters, 4]`` rows (net, first EMA, second EMA, numel);
    BETAS: fp32 ``[2]`` (the second unused without HAS_SECOND)."""
    # The hints (16-byte aligned addresses, element counts divisible by 4: what takes() checks) let the
    # compiler use 16-byte loads and stores.
    row = TABLE + tl.program_id(1).to(tl.int64) * 4
    net_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
    first_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
    numel = tl.multiple_of(tl.load(row + 3), 4)
    beta_first = tl.load(BETAS)
    one_minus_first = 1.0 - beta_first
    if HAS_SECOND:
        second_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(tl.float32)), 16)
        beta_second = tl.load(BETAS + 1)
        one_minus_second = 1.0 - beta_second
    for start in range(tl.program_id(0) * BLOCK, numel, tl.num_programs(0) * BLOCK):
        offsets = tl.multiple_of(start, BLOCK) + tl.arange(0, BLOCK)
        mask = offsets < numel
        net = tl.load(net_ptr + offsets, mask=mask)
        first = tl.load(first_ptr + offsets, mask=mask)
        tl.store(first_ptr + offsets, _lerp(net, first, beta_first, one_minus_first), mask=mask)
        if HAS_SECOND:
            second = tl.load(second_ptr + offsets, mask=mask)
            tl.store(second_ptr + offsets, _lerp(net, second, beta_second, one_minus_second), mask=mask)


def takes(net: torch.Tensor, *emas: torch.Tensor) -> bool:
    """Whether the kernel takes this parameter and its EMAs: fp32, contiguous, 16-byte aligned, of one shape
    with a number of elements divisible by 4, on one CUDA device (any device under the Triton interpreter)."""
    if (net.device.type != "cuda" and not is_interpreting()) or net.numel() % 4:
        return False
    for x in (net, *emas):
        if x.dtype != torch.float32 or x.device != net.device or not x.is_contiguous() or x.data_ptr() % 16:
            return False
    return all(x.shape == net.shape for x in emas)


class _Plan(NamedTuple):
    """What one set of tensors needs: the kernel's table (None: it takes none of them), its grid, and the
    indices of the parameters it does not take."""

    table: Optional[torch.Tensor]
    grid: tuple[int, int]
    left: tuple[int, ...]


def _plan(net: Sequence[torch.Tensor], emas: Sequence[Sequence[torch.Tensor]]) -> _Plan:
    """The plan for these tensors, from the cache when their addresses and sizes are the same (parameters keep
    their dtype and layout while they live at an address)."""
    key = (tuple(x.data_ptr() for tensors in (net, *emas) for x in tensors), tuple(x.numel() for x in net))
    plan = _PLANS.get(key)
    if plan is None:
        taken = [i for i, group in enumerate(zip(net, *emas)) if takes(*group)]
        second = emas[-1]  # without a second EMA the kernel never reads its column
        rows = [(net[i].data_ptr(), emas[0][i].data_ptr(), second[i].data_ptr(), net[i].numel()) for i in taken]
        table = torch.tensor(rows, dtype=torch.int64).to(net[0].device) if rows else None
        programs = min(PROGRAMS_PER_TENSOR, triton.cdiv(max((r[3] for r in rows), default=1), BLOCK))
        plan = _Plan(table, (programs, len(rows)), tuple(sorted(set(range(len(net))) - set(taken))))
        if len(_PLANS) >= _MAX_PLANS:
            _PLANS.pop(next(iter(_PLANS)))
        _PLANS[key] = plan
    return plan


def update_emas_(
    net: Sequence[torch.Tensor], emas: Sequence[Sequence[torch.Tensor]], betas: torch.Tensor
) -> tuple[int, ...]:
    """``emas[k][i] ← lerp(net[i], emas[k][i], betas[k])`` for one or two EMAs, in one kernel launch, for
    every parameter the kernel takes (:func:`takes`); returns the indices of the others, untouched.

    Args:
        net: the network's parameters.
        emas: one or two lists of tensors, each shaped as ``net``'s, updated in place.
        betas: fp32 ``[len(emas)]`` on the tensors' device: each EMA's decay β (1 leaves it unchanged).
    """
    if not 1 <= len(emas) <= 2 or any(len(ema) != len(net) for ema in emas):
        raise ValueError(f"update_emas_: one or two EMAs with {len(net)} tensors each, got {[len(e) for e in emas]}")
    if not net:
        return ()
    plan = _plan(net, emas)
    if plan.table is not None:
        if betas.shape != (len(emas),) or betas.dtype != torch.float32 or betas.device != net[0].device:
            raise ValueError(f"update_emas_: betas must be fp32 [{len(emas)}] on {net[0].device}")
        _ema_update_kernel[plan.grid](plan.table, betas, HAS_SECOND=len(emas) == 2, BLOCK=BLOCK, num_warps=8)
    return plan.left
