"""One optimizer step's pieces: how the global batch is split over ranks and rounds, gradient
synchronisation per round, the update (norm, clipping, AdamW, both EMAs) and the non-finite policy.

The update is skipped on device when any rank saw a non-finite loss or the gradient norm is not
finite (fused AdamW's ``found_inf``, EMA weight 1): no host sync per step; the policy is checked
once per tick (:func:`check_nonfinite`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple, cast

import torch
from omegaconf import DictConfig

from tvm.compiling import memory_budget_scope
from tvm.method.times import StepDraws
from tvm.method.wrapper import TVMWrapper
from tvm.train.ema import update_emas_
from tvm.train.sharding import gradient_norm, is_sharded, local
from tvm.train.state import Progress, RunState

if TYPE_CHECKING:
    from torch.nn.parallel import DistributedDataParallel


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses/gradients exceed the configured policy."""


@dataclass
class Batching:
    """How a global batch is split: ``batch = world · batch_gpu · rounds`` (docs/method.md §5.1 item 7)."""

    batch: int
    world: int
    batch_gpu: int
    rounds: int

    @classmethod
    def from_config(cls, batch: int, batch_gpu: int | None, world: int) -> "Batching":
        if batch % world:
            raise ValueError(f"training.batch_size={batch} is not divisible by the world size {world}")
        per_rank = batch // world
        batch_gpu = batch_gpu or per_rank
        if per_rank % batch_gpu:
            raise ValueError(
                f"training.batch_size={batch} is not divisible by world size × batch_gpu = {world} × {batch_gpu}"
            )
        return cls(batch, world, batch_gpu, per_rank // batch_gpu)

    def positions(self, rank: int, round_: int) -> torch.Tensor:
        """Positions in the global batch of this rank's micro-batch: the sampler gives rank r the
        stream positions ``r, r + W, …``, so round j holds ``r + W·(j·b + m)``, m < b."""
        return rank + self.world * (round_ * self.batch_gpu + torch.arange(self.batch_gpu))


def take(draws: StepDraws, index: torch.Tensor) -> StepDraws:
    return StepDraws(
        *(getattr(draws, f)[index.to(getattr(draws, f).device)] for f in ("t", "s", "s_prime", "beta", "noise", "drop"))
    )


def step_flops(net: TVMWrapper, batch: int) -> float:
    """≈ 11 forward-equivalents per image (JVP ≈ 3, teacher 2, FM forward 1, backward ≈ 5);
    2.6 TFLOP per image for DiT-XL/2 at 256 px."""
    return 11 * net.model.forward_flops() * batch


class Update(NamedTuple):
    """What an update reports, as 0-dim device tensors: the skip flag (bool) and the gradient norm
    before clipping."""

    skip: torch.Tensor
    grad_norm: torch.Tensor


def grad_norm_and_skip(net: TVMWrapper, max_norm: float | None, nonfinite_loss: torch.Tensor) -> Update:
    """Gradient norm (after the DDP all-reduce, so equal on all ranks), optional clipping, and the
    skip flag ``non-finite loss on any rank or non-finite gradient``."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if grads and is_sharded(grads[0]):  # FSDP2: norms of the local slices, summed over the ranks
        norm, grads = gradient_norm(grads), [local(g) for g in grads]
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if max_norm is not None:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    return Update((~torch.isfinite(norm)) | (nonfinite_loss > 0), norm.detach())


def gradient_sync(
    module: torch.nn.Module, sharded: bool, distributed: bool, sync: bool
) -> contextlib.AbstractContextManager:
    """Gradient synchronisation of one backward; ``sync``: the step's last backward.

    DDP all-reduces after the last backward only (``no_sync`` before it: the gradients accumulate
    locally, without communication). FSDP2 reduce-scatters after every backward (its default), so the
    gradients stay sharded: accumulating them unsharded until the last backward, PyTorch's other way,
    would hold 4 more bytes per parameter on every rank (2.5 GiB for DiT-XL/2, more than its whole
    sharded training state at 8 GPUs) for one reduce-scatter less per extra backward."""
    if distributed and not sharded and not sync:  # the module is DDP-wrapped
        return cast("DistributedDataParallel", module).no_sync()
    return contextlib.nullcontext()


def loss_and_backward(
    net: torch.nn.Module,
    teacher: TVMWrapper,
    x: torch.Tensor,
    labels: torch.Tensor | None,
    draws: StepDraws,
    scale: float,
    sync: Callable[[bool], contextlib.AbstractContextManager],
    split: bool = False,
    fm_budget: float | None = None,
) -> dict[str, torch.Tensor]:
    """The forward and backward of one micro-batch: the gradient of ``scale × Σ_b loss_b`` is added to
    the parameters' ``.grad``. Returns the detached per-sample terms ``{"terminal", "fm", "loss"}``.

    ``net`` is the (DDP- or FSDP2-wrapped, maybe compiled) online :class:`TVMWrapper`; ``sync(last)``
    is the gradient synchronisation of a backward, ``last`` telling whether it is this micro-batch's
    last (:func:`gradient_sync` of the round, for instance).

    * ``split=False`` (upstream): one forward of the whole objective, one backward of its sum.
    * ``split=True`` (``training.split_backward``): the terminal-velocity term's forward (the
      online network's JVP and the teacher) and its backward, without gradient sync, then the
      flow-matching term's forward and backward. The same gradient, summed in another order (equal
      to fp32 rounding); the activations of the two online passes are never held together, so the
      peak is the larger of the two instead of their sum. The flow-matching graphs are compiled
      keeping ``fm_budget`` of their activations (:func:`memory_budget_scope`; None: the run's budget).
    """
    if not split:
        with sync(True):
            terms = net(x, labels, draws, teacher)
            (terms["loss"].sum() * scale).backward()
        return {name: value.detach() for name, value in terms.items()}
    with sync(False):
        first = net(x, labels, draws, teacher, phase="terminal")
        (first["terminal"].sum() * scale).backward()
    with sync(True), memory_budget_scope(fm_budget):
        fm = net(first["fm_target"], phase="fm")["fm"]
        (fm.sum() * scale).backward()
    terminal, fm = first["terminal"].detach(), fm.detach()
    return {"terminal": terminal, "fm": fm, "loss": terminal + fm}


def apply_update(
    state: RunState,
    max_grad_norm: float | None,
    ema_beta: float,
    ema_target_beta: float | None,
    nonfinite_loss: torch.Tensor,
) -> Update:
    """Clip, AdamW (skipped on device by fused AdamW's ``found_inf`` when non-finite), then the eval
    EMA and the teacher EMA in that order (docs/method.md §5.2 items 5–9). No host sync."""
    skip, norm = grad_norm_and_skip(state.net, max_grad_norm, nonfinite_loss)
    state.optimizer.found_inf = skip.float()  # type: ignore[attr-defined]  # read by fused AdamW's step
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    emas = [(state.ema, ema_beta)]
    if ema_target_beta is not None:
        emas.append((state.teacher, ema_target_beta))
    update_emas_(state.net, emas, skip)
    return Update(skip, norm)


class NonFiniteCounter:
    """Skipped steps counted on the device, without a host sync per step; :meth:`sync` (once per
    tick) moves the counts into :class:`Progress` and returns the longest run of consecutive skipped
    steps since the last sync, for :func:`check_nonfinite`."""

    def __init__(self, progress: Progress, device: torch.device) -> None:
        self.skipped = torch.zeros((), device=device)  # skipped steps since the last sync
        self.in_row = torch.full((), float(progress.in_row), device=device)  # consecutive skipped steps now
        self.longest = self.in_row.clone()  # longest run of consecutive skipped steps since the last sync

    def record(self, skip: torch.Tensor) -> None:
        """Count one step; ``skip`` is the step's 0-dim bool skip flag (:class:`Update`)."""
        self.skipped += skip.float()
        self.in_row = (self.in_row + 1) * skip.float()
        torch.maximum(self.longest, self.in_row, out=self.longest)

    def sync(self, progress: Progress) -> int:
        """Add the skipped steps to ``progress`` (one host sync) and return the longest run since the last sync."""
        skipped, progress.in_row, longest = (
            int(v) for v in torch.stack((self.skipped, self.in_row, self.longest)).tolist()
        )
        progress.skipped += skipped
        self.skipped.zero_()
        self.longest.copy_(self.in_row)
        return longest


def check_nonfinite(tcfg: DictConfig, progress: Progress, longest_in_row: int = 0) -> None:
    """The non-finite policy, checked once per tick (one host sync). ``longest_in_row`` is the longest
    run of consecutive skipped steps since the last check: a run of K in mid-tick followed by good
    steps must stop the run too, not only K in a row at the end of the tick."""
    if tcfg.nonfinite_policy == "raise" and progress.skipped:
        raise NonFiniteLossError(
            f"{progress.skipped} step(s) had non-finite losses or gradients by step "
            f"{progress.step} (training.nonfinite_policy=raise); nothing was applied"
        )
    in_row = max(progress.in_row, longest_in_row)
    if in_row >= tcfg.max_nonfinite_in_row:
        raise NonFiniteLossError(
            f"{in_row} consecutive steps had non-finite losses or gradients "
            f"(limit training.max_nonfinite_in_row={tcfg.max_nonfinite_in_row}) by step "
            f"{progress.step}; the weights, EMAs and checkpoints hold no NaN"
        )
