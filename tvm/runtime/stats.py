"""Training statistics accumulated on the device, reduced once per tick.

Upstream reported every per-sample loss with one ``.item()`` each (a host sync per sample per
step, docs/method.md §11 item 20). Here each named statistic is a float64 tensor ``[count, sum, sumsq]``
living on the training device; ``report`` only launches small device kernels, and the single
host synchronisation happens in ``summarize`` (once per tick, docs/method.md §5.4 item 8), which
all-reduces the moments across ranks and returns the means (docs/method.md §5.8).

float64 accumulators need a device that supports them (CPU, CUDA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from tvm.runtime import distributed

INF_REPLACEMENT = 1e5  # docs/method.md §5.2 item 3: NaN -> 0, ±inf -> ±1e5 before reporting


def sanitize(values: torch.Tensor) -> torch.Tensor:
    """NaN -> 0, +inf -> 1e5, -inf -> -1e5 (for reporting only; never feed back into training)."""
    return torch.nan_to_num(values, nan=0.0, posinf=INF_REPLACEMENT, neginf=-INF_REPLACEMENT)


def time_bins(t: torch.Tensor, bins: int = 4) -> torch.Tensor:
    """Bin index ``⌊bins·min(t, 0.999)⌋`` clamped to ``[0, bins-1]`` (docs/method.md §5.2 item 3).

    With 4 bins: q0 is t < 0.25, ..., q3 is t ≥ 0.75 (including t = 1). A NaN time goes to q0.
    """
    times = torch.nan_to_num(t.detach().to(torch.float64), nan=0.0)
    scaled = torch.floor(bins * times.clamp(max=0.999))
    return scaled.clamp(0, bins - 1).to(torch.int64)


class StatsCollector:
    """Named running moments of per-sample values, kept on ``device`` without host syncs.

    Usage per step: ``report("Loss/fm_loss", fm[B])`` or ``report_binned("Loss/fm_loss", fm, t)``;
    per tick: ``means = collector.summarize()`` on every rank (it is a collective when a process
    group exists), which also resets the collector.
    """

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self._moments: dict[str, torch.Tensor] = {}

    def _slot(self, name: str) -> torch.Tensor:
        slot = self._moments.get(name)
        if slot is None:
            slot = torch.zeros(3, dtype=torch.float64, device=self.device)
            self._moments[name] = slot
        return slot

    def _as_values(self, values: torch.Tensor | float | Sequence[float], clean: bool) -> torch.Tensor:
        tensor = torch.as_tensor(values).detach().to(device=self.device, dtype=torch.float64)
        tensor = tensor.reshape(-1)
        return sanitize(tensor) if clean else tensor

    def report(self, name: str, values: torch.Tensor | float | Sequence[float], clean: bool = True) -> None:
        """Add every element of ``values`` to statistic ``name`` (NaN/inf sanitised if ``clean``)."""
        flat = self._as_values(values, clean)
        slot = self._slot(name)
        slot[0] += flat.numel()
        slot[1:].add_(torch.stack((flat.sum(), flat.square().sum())))

    def report_binned(
        self, name: str, values: torch.Tensor, t: torch.Tensor, bins: int = 4, clean: bool = True
    ) -> None:
        """Report ``values[B]`` split by the time ``t[B]`` into ``name_q0 .. name_q{bins-1}``.

        Empty bins contribute a zero count (they do not appear in ``summarize`` unless some
        rank saw a sample in them during the tick).
        """
        flat = self._as_values(values, clean)
        times = torch.as_tensor(t).detach().to(self.device).reshape(-1)
        if flat.numel() != times.numel():
            raise ValueError(f"report_binned({name!r}): {flat.numel()} values but {times.numel()} times")
        one_hot = torch.nn.functional.one_hot(time_bins(times, bins), bins).to(torch.float64)  # [B, bins]
        moments = torch.stack((one_hot.sum(0), flat @ one_hot, flat.square() @ one_hot), dim=1)  # [bins, 3]
        for k in range(bins):
            self._slot(f"{name}_q{k}").add_(moments[k])

    def names(self) -> list[str]:
        """Names reported on this rank since the last ``summarize``."""
        return sorted(self._moments)

    def _reduce(self) -> list[tuple[str, float, float, float]]:
        """``(name, count, sum, sumsq)`` summed over ranks for names with a non-zero count; resets."""
        names = sorted(set().union(*distributed.all_gather_object(self.names())))
        self._moments, local = {}, self._moments
        if not names:
            return []
        zero = torch.zeros(3, dtype=torch.float64, device=self.device)
        table = distributed.all_reduce_sum_(torch.stack([local.get(name, zero) for name in names]))
        return [(name, *row) for name, row in zip(names, table.cpu().tolist(), strict=True) if row[0] > 0]

    def summarize(self) -> dict[str, float]:
        """All-reduce the moments across ranks, return ``{name: mean}`` and reset.

        A collective: every rank must call it at the same point. Names reported on only some
        ranks are handled (their moments count as zero elsewhere); names with a global count of
        zero are left out. Host synchronisation happens only here (name exchange + one reduce).
        """
        return {name: total / count for name, count, total, _ in self._reduce()}

    def summarize_std(self) -> dict[str, tuple[float, float]]:
        """Like ``summarize`` but returns ``{name: (mean, population std)}``."""
        result = {}
        for name, count, total, squares in self._reduce():
            mean = total / count
            result[name] = (mean, math.sqrt(max(squares / count - mean * mean, 0.0)))
        return result
