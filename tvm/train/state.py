"""The run's state and its checkpoints: how long a run is, what a checkpoint holds, how a run's state
is built, saved and restored.

``RunState`` is everything a checkpoint restores (online network, eval EMA, teacher EMA, optimizer,
progress); :func:`build_run_state` builds it (DDP or FSDP2 around the online network),
:func:`checkpoint_content` builds the file's content, :func:`save_checkpoint` writes it from rank 0
and :func:`restore` loads it back, with errors that name the file, the first mismatching parameter
and the differing settings. Sharded (FSDP2) states are gathered into and loaded from the same format
(tvm/train/sharding.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from tvm.config import to_container
from tvm.method.wrapper import TVMWrapper
from tvm.runtime import distributed
from tvm.runtime.build import build_network, build_optimizer, train_in_fp8
from tvm.runtime.checkpoint import (
    CheckpointError,
    CheckpointManager,
    CheckpointWriteError,
    capture_rng_state,
    load_checkpoint,
    module_state_dict,
    restore_rng_state,
    state_dict_differences,
)
from tvm.runtime.run_logging import sanitize_config
from tvm.train.ema import make_ema
from tvm.train.sharding import (
    broadcast_parameters_,
    full_state_dict,
    is_sharded,
    shard_optimizer_state,
    shard_run,
    shard_state_dict,
)


@dataclass(frozen=True)
class Schedule:
    """How long the run is: ``steps_per_tick`` optimizer steps per tick (≈ ``kimg_per_tick`` thousand
    images, at least one step) and ``total_steps`` = ``total_ticks`` ticks, or ``max_steps`` if fewer."""

    steps_per_tick: int
    total_steps: int

    @classmethod
    def from_config(cls, tcfg: DictConfig) -> "Schedule":
        steps_per_tick = max(1, round(tcfg.kimg_per_tick * 1000 / tcfg.batch_size))
        total_steps = tcfg.total_ticks * steps_per_tick
        return cls(steps_per_tick, total_steps if tcfg.max_steps is None else min(total_steps, tcfg.max_steps))


@dataclass
class Progress:
    step: int = 0  # optimizer steps done
    skipped: int = 0  # steps skipped for non-finite values
    in_row: int = 0  # consecutive skipped steps at the last check

    def state_dict(self, batch_size: int, steps_per_tick: int) -> dict[str, int]:
        return {
            "step": self.step,
            "nimg": self.step * batch_size,
            "tick": self.step // steps_per_tick,
            "skipped": self.skipped,
            "in_row": self.in_row,
        }


@dataclass
class RunState:
    """Everything a checkpoint restores."""

    net: TVMWrapper
    ema: TVMWrapper
    teacher: TVMWrapper
    optimizer: torch.optim.Optimizer
    progress: Progress

    @property
    def sharded(self) -> bool:
        """True when the modules are FSDP2-sharded (their parameters are DTensors)."""
        return is_sharded(next(self.net.parameters()))


def build_run_state(
    cfg: DictConfig, data_shape: tuple[int, int, int], dist: distributed.DistContext, init: bool
) -> tuple[RunState, torch.nn.Module]:
    """The run's state and the module the loop calls: the online network (``init``: with its
    initialisation, else allocated without values for a checkpoint to fill), its EMAs and AdamW.

    ``data_shape`` is (resolution, channels, label_dim). DDP broadcasts rank 0's weights and the EMAs
    are copies made after that (docs/method.md §1.5); FSDP2 (``network.sharding=fsdp2``): the same
    broadcast, then the network and both EMAs are sharded alike (tvm/train/sharding.py) and the
    network itself is the module the loop calls.
    """
    ncfg = cfg.network
    net = build_network(ncfg, *data_shape, dist.device, init=init)
    train_in_fp8(net, ncfg)
    trained: torch.nn.Module = net
    if ncfg.sharding == "fsdp2":
        broadcast_parameters_(net)
        ema, teacher = make_ema(net), make_ema(net)
        shard_run(net, ema, teacher)
    else:
        if dist.distributed:
            trained = DistributedDataParallel(
                net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None
            )
        ema, teacher = make_ema(net), make_ema(net)
    optimizer = build_optimizer(cfg.optimizer, net.parameters(), dist.device)
    return RunState(net, ema, teacher, optimizer, Progress()), trained


def checkpoint_content(
    state: RunState, cfg: DictConfig, batch: int, steps_per_tick: int, data: dict[str, int]
) -> dict[str, Any]:
    """Everything to resume exactly. The data position is ``step · batch`` (the sampler's global
    stream index) and each step's draws derive from (seed, step); the global RNG states are kept
    for anything else that draws (e.g. dropout).

    Sharded (FSDP2) runs call this on every rank: weights and optimizer moments are all-gathered
    into full tensors kept on rank 0 (the file is the one a DDP run writes)."""
    full = (lambda sd: full_state_dict(sd, distributed.is_main())) if state.sharded else (lambda sd: sd)
    return {
        "net": full(module_state_dict(state.net)),
        "ema": full(module_state_dict(state.ema)),
        "ema_target": full(module_state_dict(state.teacher)),
        "optimizer": full(state.optimizer.state_dict()),
        "progress": state.progress.state_dict(batch, steps_per_tick),
        "rng": capture_rng_state(),
        "config": sanitize_config(to_container(cfg)),
        "data": data,
    }


def save_checkpoint(
    ckpts: CheckpointManager, content: Callable[[], dict[str, Any]], step: int, collective: bool = False
) -> None:
    """Rank 0 writes the checkpoint of ``step`` (``content()``; ``collective``: every rank builds it,
    for the all-gathers of a sharded run). A failure there (disk full, unwritable directory) is raised
    on every rank alike, so that no rank waits at the next collective until the process-group
    timeout. The previous checkpoint stays intact (atomic write). One small collective per checkpoint."""
    error: Exception | None = None
    gathered = content() if collective else None
    if distributed.is_main():
        try:
            ckpts.save(content() if gathered is None else gathered, step)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = exc
    path = ckpts.path_for(step)
    distributed.raise_on_every_rank(
        error,
        lambda message, errno: CheckpointWriteError(
            f"rank 0 could not write checkpoint {path}: {message}", path, errno
        ),
    )


def weights_mismatch(module: torch.nn.Module, weights: dict[str, Any]) -> str:
    """What differs between a module and a state dict: the first key of each kind and the counts."""
    own = module.state_dict()
    missing, unexpected, shapes = state_dict_differences(own, weights)
    parts = []
    if shapes:
        key = shapes[0]
        parts.append(
            f"{key} is {list(weights[key].shape)} in the checkpoint but {list(own[key].shape)} here"
            + (f" ({len(shapes)} keys differ in shape)" if len(shapes) > 1 else "")
        )
    if missing:
        parts.append(f"{len(missing)} keys missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    return "; ".join(parts)


def config_differences(stored: Any, cfg: DictConfig | None, section: str = "network") -> list[str]:
    """``network.<key>: <stored> in the checkpoint, <current> here`` for every differing key of a section."""
    if cfg is None or not isinstance(stored, dict) or not isinstance(stored.get(section), dict):
        return []
    current = to_container(cfg).get(section) or {}
    return [
        f"{section}.{key}: {stored[section].get(key)!r} in the checkpoint, {value!r} here"
        for key, value in current.items()
        if key in stored[section] and stored[section][key] != value
    ]


RESUME_REPLACES = ("net", "ema", "ema_target", "rng")


def replaces_initialisation(ckpt: dict[str, Any] | None) -> bool:
    """Whether resuming from ``ckpt`` (:func:`restore`, not ``weights_only``) leaves nothing of the
    network's initialisation: it holds the online weights, both EMAs and the global RNG states.

    ``restore`` loads each of those weights strictly (every parameter, or ``CheckpointError``) and
    sets the RNG states, so neither the initial values nor the random numbers the initialisation
    drew reach the run; a run built without the initialisation and resumed from ``ckpt`` is the
    run built with it, bit for bit (the initialisation runs on the CPU before the move to the
    device: it draws nothing from the CUDA generators, which ``restore`` sets only where the device
    count matches). Without the ``rng`` entry the CPU generator's state after the build would decide
    later draws (e.g. the data-loader workers' seeds): the initialisation then runs.
    """
    return ckpt is not None and all(key in ckpt for key in RESUME_REPLACES)


def restore(
    state: RunState,
    ckpt: dict[str, Any],
    weights_only: bool,
    path: Path | str = "<checkpoint>",
    cfg: DictConfig | None = None,
) -> None:
    """Load a checkpoint into the run (``weights_only``: fine-tuning transfer of the EMA weights).

    Weights of another model size or data shape raise ``CheckpointError`` naming ``path``, the
    first mismatching parameter and the ``network.*`` settings that differ from ``cfg``.
    """

    def load(module: torch.nn.Module, name: str) -> None:
        try:
            module.load_state_dict(shard_state_dict(ckpt[name], module) if state.sharded else ckpt[name])
        except RuntimeError as exc:
            differences = config_differences(ckpt.get("config"), cfg)
            raise CheckpointError(
                f"{path}: its {name!r} weights do not fit the network this run builds "
                f"({weights_mismatch(module, ckpt[name]) or str(exc).splitlines()[0]})"
                + (f"; config differences: {', '.join(differences)}" if differences else "")
                + "; it was written for another model size or data shape: use the config it was trained with, "
                "or another run directory"
            ) from exc

    if weights_only:
        for module in (state.net, state.ema, state.teacher):
            load(module, "ema")
        return
    load(state.net, "net")
    load(state.ema, "ema")
    load(state.teacher, "ema_target")
    try:
        state.optimizer.load_state_dict(
            shard_optimizer_state(ckpt["optimizer"], state.optimizer) if state.sharded else ckpt["optimizer"]
        )
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer ({exc})") from exc
    progress = ckpt["progress"]
    state.progress = Progress(progress["step"], progress.get("skipped", 0), progress.get("in_row", 0))
    if "rng" in ckpt:
        restore_rng_state(ckpt["rng"])


def find_resume_checkpoint(resume: str | None, ckpts: CheckpointManager) -> tuple[Path, dict[str, Any]] | None:
    """``(path, content)`` of the checkpoint the run resumes from, or None.

    ``training.resume`` when set (its weights, EMAs and optimizer required: a missing or unreadable
    file raises ``CheckpointError``), else the run directory's newest fully loadable checkpoint
    (unreadable newer ones are skipped with a warning, ``CheckpointManager.load_latest``).
    """
    if resume:
        return Path(resume), load_checkpoint(resume, require=("net", "ema", "ema_target", "optimizer"))
    return ckpts.load_latest()


def already_finished(
    progress: Progress, total_steps: int, checkpoint: Path, run_dir: Path, batch: int, steps_per_tick: int
) -> dict[str, Any]:
    """The result of a run whose checkpoint is at or past ``total_steps``; rank 0 says so."""
    if distributed.is_main():
        print(
            f"run already finished: {checkpoint} is at step {progress.step} >= total {total_steps} "
            f"(training.total_ticks × {steps_per_tick} steps/tick, or training.max_steps); nothing to do. "
            "Raise training.total_ticks to train on, or set another run_dir for a new run.",
            flush=True,
        )
    return {
        "progress": progress.state_dict(batch, steps_per_tick),
        "metrics": {},
        "run_dir": str(run_dir),
        "preempted": False,
        "signal": None,
        "already_finished": True,
    }
