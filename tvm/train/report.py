"""What a training run reports besides its checkpoints: the log (``log.txt``, ``stats.jsonl``, wandb),
its opening and per-tick lines (docs/method.md §5.4), sample grids and metrics of the eval EMA.

Secrets come from the environment only; a value that reached the config (e.g. through
``${oc.env:WANDB_API_KEY}``) is redacted from everything written or sent (docs/method.md §5.8).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from tvm.config import to_container
from tvm.data.encoders import Encoder
from tvm.eval.generate import generate_images
from tvm.eval.grid import grid_classes, grid_layout, save_image_grid
from tvm.eval.metrics import MetricContext, compute_metric
from tvm.method.wrapper import TVMWrapper
from tvm.runtime import distributed
from tvm.runtime.run_logging import (
    RunLogger,
    binned_means,
    peak_memory_gb,
    reset_peak_memory,
    sanitize_config,
    status_line,
)
from tvm.runtime.stats import StatsCollector

PEAK_FLOPS = {"cuda": 800e12}  # bf16 dense peak used for MFU (measured on the lent H100)


def open_run_logger(cfg: DictConfig, run_dir: Path, rank: int) -> RunLogger:
    """The run's logger; rank 0 also writes the (sanitised) ``config.yaml`` into the run directory."""
    logger = RunLogger(
        run_dir,
        rank,
        wandb_mode=str(cfg.logger.mode),
        project=sanitize_config(cfg.logger.project),
        entity=sanitize_config(cfg.logger.entity),
        run_name=sanitize_config(cfg.name),
        config_dict=to_container(cfg),
    )
    if rank == 0:
        (run_dir / "config.yaml").write_text(sanitize_config(OmegaConf.to_yaml(cfg)))
    return logger


def log_error_on_exit(logger: RunLogger) -> Callable[..., None]:
    """An ``ExitStack`` exit callback that writes the exception ending the run to the log (best effort)."""

    def log(kind: type[BaseException] | None, error: BaseException | None, _traceback: Any) -> None:
        if kind is not None:
            with contextlib.suppress(Exception):  # e.g. the disk that is full also holds log.txt
                logger.log(f"run stopped by {kind.__name__}: {error}")

    return log


class TickMeter:
    """Throughput of the current tick (images/s, MFU against :data:`PEAK_FLOPS` × world size) and the
    run's wall time, for the tick line."""

    def __init__(self, step: int, step_flops: float, device: torch.device, world_size: int) -> None:
        peak = PEAK_FLOPS.get(device.type)
        self.step_flops, self.peak = step_flops, None if peak is None else peak * world_size
        self.device = device
        self.run_start = time.time()
        self.start(step)

    def start(self, step: int) -> None:
        """A tick starts at ``step`` now (after the previous tick's maintenance)."""
        self.tick_start = self.tick_end = time.time()
        self.tick_step0 = step

    def stop(self) -> None:
        """The tick's steps end now; the maintenance that follows (its host syncs included) is not in its time."""
        self.tick_end = time.time()

    def report(self, logger: RunLogger, stats: StatsCollector, tick: int, step: int, batch: int, skipped: int) -> None:
        """The tick line (``status_line``) and the tick's stats for the steps up to :meth:`stop`, then a new
        peak-memory window."""
        summary = stats.summarize()
        steps_done = step - self.tick_step0
        elapsed = max(self.tick_end - self.tick_start, 1e-9)
        img_per_sec = steps_done * batch / elapsed
        mfu = self.step_flops * steps_done / elapsed / self.peak if self.peak else None
        line = status_line(
            tick=tick,
            kimg=step * batch / 1e3,
            step=step,
            sec_per_kimg=elapsed / max(steps_done * batch / 1e3, 1e-9),
            img_per_sec=img_per_sec,
            peak_mem_gb=peak_memory_gb(self.device),
            losses={
                "terminal": binned_means(summary, "Loss/terminal_loss"),
                "fm": binned_means(summary, "Loss/fm_loss"),
            },
            mfu=mfu,
            total_sec=time.time() - self.run_start,
            sec_per_tick=elapsed,
        )
        logger.log(line + (f" skipped {skipped}" if skipped else ""))
        extra = {"mfu": mfu} if mfu is not None else {}
        logger.log_stats(summary, step, tick=tick, img_per_sec=img_per_sec, skipped_steps=skipped, **extra)
        reset_peak_memory(self.device)


def save_sample_grids(
    ema: TVMWrapper, encoder: Encoder, cfg: DictConfig, run_dir: Path, tick: int, logger: RunLogger
) -> None:
    """PNG grids from fixed noise and classes at every configured sampler (rank 0)."""
    if not distributed.is_main():
        return
    n = cfg.training.num_samples
    num_classes = ema.model.num_classes
    classes = grid_classes(n, num_classes)
    for name, sampler_cfg in cfg.sampling.items():
        images = generate_images(
            ema,
            encoder,
            list(range(n)),
            steps=sampler_cfg.num_steps,
            guidance=sampler_cfg.cfg_scale,
            seed=cfg.eval.seed,
            classes=classes,
            device=next(ema.parameters()).device,
        )
        path = save_image_grid(
            images, run_dir / "samples" / f"{name}-tick{tick:06d}.png", **grid_layout(n, num_classes, images.shape[-1])
        )
        logger.log_images(f"samples/{name}", path, tick)


def evaluate(ema: TVMWrapper, cfg: DictConfig, ctx: MetricContext, logger: RunLogger, step: int) -> dict[str, float]:
    """Every configured metric at every sampler; appended to ``metrics.jsonl`` by the logger."""
    ema.eval()
    results: dict[str, float] = {}
    for metric in cfg.training.metrics:
        for name, sampler_cfg in cfg.sampling.items():
            values = compute_metric(metric, ema, ctx, sampler_cfg.num_steps, sampler_cfg.cfg_scale)
            results |= {f"{name}_{metric}_{key}": value for key, value in values.items()}
    logger.log("metrics at step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in results.items())))
    logger.log_stats(results, step, kind="metrics")
    return results
