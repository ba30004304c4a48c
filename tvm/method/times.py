"""Time, guidance and label-dropout sampling for the TVM loss (docs/method.md §2, §1.6, §10.3).

Every draw of a training step is made here, for the **global** batch, from one generator that
the loop seeds with (run seed, step); each rank and accumulation round then takes its rows
(``Batching.positions`` in tvm/train/update.py, the data sampler's rule). Results therefore depend
neither on the number of GPUs nor on gradient accumulation, and a resumed run draws exactly what
an uninterrupted one would.

Time schemes (``TimeSampling.scheme``):

* ``"gap"`` (default): gap ``g = σ(N(μ_g, σ_g²))``, ``s`` logit-normal truncated to
  ``logit(s) ≤ logit(1 − g)`` by inverse CDF, ``t = min(s + g, 1)``;
* ``"trunc"``: ``t = σ(N(μ_t, σ_t²))`` and ``s`` logit-normal truncated to ``logit(s) ≤ logit(t)``;
* ``"clamp"``: independent logit-normal t and s, then ``s ← t`` where ``s > t``.

``fm_time``: ``"separate"`` (default; the paper's gap\\* sampler draws an independent
``s' = σ(N(μ_s, σ_s²))`` for the flow-matching term) or ``"shared"`` (``s' = s``).
``frac_t_eq_s``: a fraction of samples with ``s = t`` (paper Table 4d); 0 by default.

Guidance (``Guidance``): a fixed scale ``cfg`` (β = 1/cfg); a range ``[min_cfg, max_cfg]`` with
``w ~ U`` (upstream) or ``β ~ U[1/max, 1/min]`` (paper text, ``cfg_range_mode="beta"``); or neither,
``β ~ U[0, 1)``.

Both settings are built from the ``loss`` section of the run config by :meth:`from_config`: the
field names are the schema's keys (``tvm/config.py`` ``LossConfig``), so nothing is copied by hand.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Mapping, TypeVar

import torch
from torch.utils._pytree import register_pytree_node

TIME_SCHEMES = ("gap", "trunc", "clamp")
FM_TIMES = ("separate", "shared")
RANGE_MODES = ("w", "beta")

_Settings = TypeVar("_Settings", bound="_FromConfig")


class _FromConfig:
    """``from_config(section)``: the dataclass from the config keys of the same names."""

    @classmethod
    def from_config(cls: type[_Settings], section: Mapping[str, Any]) -> _Settings:
        """Build from a config section (``cfg.loss``) that has a key for every field; config
        choices (``str`` enums) become plain strings."""
        values = {f.name: section[f.name] for f in fields(cls)}  # type: ignore[arg-type]
        return cls(**{name: str(v) if isinstance(v, str) else v for name, v in values.items()})


@dataclass(frozen=True)
class TimeSampling(_FromConfig):
    """Parameters of the time sampler (defaults: all four ImageNet configs, docs/method.md §2)."""

    scheme: str = "gap"
    fm_time: str = "separate"
    s_P_mean: float = -0.4
    s_P_std: float = 1.0
    gap_P_mean: float = -0.8
    gap_P_std: float = 1.0
    t_P_mean: float = 1.0
    t_P_std: float = 1.0
    frac_t_eq_s: float = 0.0

    def __post_init__(self) -> None:
        if self.scheme not in TIME_SCHEMES:
            raise ValueError(f"unknown time scheme {self.scheme!r}; allowed: {', '.join(TIME_SCHEMES)}")
        if self.fm_time not in FM_TIMES:
            raise ValueError(f"unknown fm_time {self.fm_time!r}; allowed: {', '.join(FM_TIMES)}")
        if not 0.0 <= self.frac_t_eq_s <= 1.0:
            raise ValueError(f"frac_t_eq_s must lie in [0, 1], got {self.frac_t_eq_s}")
        for name in ("s_P_std", "gap_P_std", "t_P_std"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


@dataclass(frozen=True)
class Guidance(_FromConfig):
    """CFG-scale sampling (docs/method.md §2 item 6); all scales are w = 1/β ≥ 1. The field names are the
    authors' config keys (``loss.cfg``: a fixed scale)."""

    cfg: float | None = None
    min_cfg: float | None = None
    max_cfg: float | None = None
    cfg_range_mode: str = "w"
    label_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("cfg", "min_cfg", "max_cfg"):
            value = getattr(self, name)
            if value is not None and not value >= 1.0:
                raise ValueError(f"{name} = {value} is not allowed: CFG scales must be >= 1 (w = 1 is unguided)")
        if (self.min_cfg is None) != (self.max_cfg is None):
            raise ValueError("min_cfg and max_cfg must be given together")
        if self.min_cfg is not None and self.max_cfg is not None and self.min_cfg > self.max_cfg:
            raise ValueError(f"min_cfg = {self.min_cfg} exceeds max_cfg = {self.max_cfg}")
        if self.cfg_range_mode not in RANGE_MODES:
            raise ValueError(f"unknown cfg_range_mode {self.cfg_range_mode!r}; allowed: {', '.join(RANGE_MODES)}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")


def logit(p: torch.Tensor) -> torch.Tensor:
    return torch.log(p / (1 - p))


def truncated_logit_normal(u: torch.Tensor, upper_logit: torch.Tensor, mean: float, std: float) -> torch.Tensor:
    """σ(z) with z ~ N(mean, std²) truncated to ``z ≤ upper_logit``, by inverse CDF of u ∈ [0, 1).

    ``p = u·Φ(a)``, ``z = Φ⁻¹(p) = mean + std·√2·erfinv(2p − 1)`` (docs/method.md §2 item 3);
    p = 0 gives 0.
    """
    # Φ and Φ⁻¹ written out with the operation order of torch.distributions.Normal (same values),
    # without its argument validation, which reads tensors back to the host (a GPU sync per step).
    cdf_upper = 0.5 * (1 + torch.erf((upper_logit - mean) * (1.0 / std) / math.sqrt(2)))
    p = u * cdf_upper
    return torch.sigmoid(mean + std * torch.erfinv(2 * p - 1) * math.sqrt(2))


def sample_times(
    gen: torch.Generator, n: int, times: TimeSampling, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw ``(t, s, s')`` for n samples, each ``[n, 1, 1, 1]`` fp32, with ``0 ≤ s ≤ t ≤ 1``.

    Draw order for the default gap scheme follows upstream (randn for g, rand for s, randn for s').
    """
    shape = (n, 1, 1, 1)

    def randn() -> torch.Tensor:
        return torch.randn(shape, generator=gen, device=device)

    def rand() -> torch.Tensor:
        return torch.rand(shape, generator=gen, device=device)

    if times.scheme == "gap":
        g = torch.sigmoid(randn() * times.gap_P_std + times.gap_P_mean)
        s = truncated_logit_normal(rand(), logit(1 - g), times.s_P_mean, times.s_P_std)
        t = torch.clamp(s + g, max=1.0)
    elif times.scheme == "trunc":
        t = torch.sigmoid(randn() * times.t_P_std + times.t_P_mean)
        s = truncated_logit_normal(rand(), logit(t), times.s_P_mean, times.s_P_std)
    else:  # clamp
        t = torch.sigmoid(randn() * times.t_P_std + times.t_P_mean)
        s = torch.minimum(torch.sigmoid(randn() * times.s_P_std + times.s_P_mean), t)
    s_prime = torch.sigmoid(randn() * times.s_P_std + times.s_P_mean) if times.fm_time == "separate" else s
    if times.frac_t_eq_s > 0:
        s = torch.where(rand() < times.frac_t_eq_s, t, s)
        if times.fm_time == "shared":
            s_prime = s
    return t, s, s_prime


def sample_beta(gen: torch.Generator, n: int, guidance: Guidance, device: torch.device | str = "cpu") -> torch.Tensor:
    """β = 1/w for n samples, ``[n, 1, 1, 1]`` fp32 (docs/method.md §2 item 6, §12 item 24)."""
    shape = (n, 1, 1, 1)
    if guidance.cfg is not None:
        return torch.ones(shape, device=device) / guidance.cfg
    if guidance.min_cfg is not None and guidance.max_cfg is not None:  # given together (Guidance)
        u = torch.rand(shape, generator=gen, device=device)
        if guidance.cfg_range_mode == "w":
            return 1.0 / (guidance.min_cfg + u * (guidance.max_cfg - guidance.min_cfg))
        lo, hi = 1.0 / guidance.max_cfg, 1.0 / guidance.min_cfg
        return lo + u * (hi - lo)
    return torch.rand(shape, generator=gen, device=device)


@dataclass
class StepDraws:
    """All random quantities of one training step for a batch (docs/method.md §2).

    Shapes: ``t, s, s_prime, beta`` ``[n, 1, 1, 1]``; ``noise`` ``[n, C, R, R]``; ``drop`` ``[n]`` bool
    (label dropped → null class and β = 1, applied by ``objective.apply_label_dropout``). ``beta`` here is
    before dropout is applied.
    """

    t: torch.Tensor
    s: torch.Tensor
    s_prime: torch.Tensor
    beta: torch.Tensor
    noise: torch.Tensor
    drop: torch.Tensor

    def to(self, device: torch.device | str) -> "StepDraws":
        return StepDraws(*(getattr(self, f).to(device) for f in ("t", "s", "s_prime", "beta", "noise", "drop")))


# A pytree node (its fields are the leaves, in order), so that tree utilities such as the captured step's
# input copy (tvm/train/step_graph.py) reach its tensors. (register_pytree_node: torch >= 2.2; the
# dataclass shortcut came later.)
register_pytree_node(
    StepDraws,
    lambda draws: ([getattr(draws, f.name) for f in fields(draws)], None),
    lambda leaves, _: StepDraws(*leaves),
)


def draw_step(
    gen: torch.Generator,
    n: int,
    sample_shape: tuple[int, ...],
    times: TimeSampling,
    guidance: Guidance,
    device: torch.device | str = "cpu",
) -> StepDraws:
    """Make every draw of one step for n samples, in upstream's order (docs/method.md §2 items 1–8)."""
    t, s, s_prime = sample_times(gen, n, times, device)
    beta = sample_beta(gen, n, guidance, device)
    noise = torch.randn((n, *sample_shape), generator=gen, device=device)
    drop = torch.rand(n, generator=gen, device=device) < guidance.label_dropout
    return StepDraws(t, s, s_prime, beta, noise, drop)
