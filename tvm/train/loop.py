"""The TVM training loop (TVM.md §5). Reads top to bottom: set-up, then one step, then the
maintenance at the end of each tick.

What differs from upstream, on purpose (TVM.md §11):

* real gradient accumulation (``batch_gpu`` < batch/world gives the full-batch gradient);
* each step's random draws are made for the global batch from a generator seeded by
  (seed, step) and every rank/round takes its positions, like the data sampler: the run does
  not depend on the number of GPUs or accumulation rounds, and resume is exact;
* non-finite losses or gradients are never hidden: the step is skipped on device (fused AdamW's
  ``found_inf``, EMA weight 1) on all ranks alike, counted, and the run stops after
  ``max_nonfinite_in_row`` (or at once with ``nonfinite_policy=raise``), checked once per tick;
* one checkpoint format with everything needed to resume, written atomically by rank 0;
  a run directory that holds checkpoints resumes from the latest one;
* the length is the paper's (300K iterations) and every tick has the same number of steps.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from tvm.compiling import compile_model, load_compile_cache, save_compile_cache, set_activation_memory_budget
from tvm.config import to_container, validate_config
from tvm.eval.generate import generate_images
from tvm.eval.grid import save_image_grid
from tvm.eval.metrics import METRICS, MetricContext, check_reference_files, compute_metric, extra_metric_fields
from tvm.method.times import StepDraws, draw_step
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import count_parameters
from tvm.train import distributed
from tvm.train.build import (build_dataset, build_network, build_optimizer, encoder_from_config, guidance,
                             time_sampling)
from tvm.train.checkpoint import (CheckpointError, CheckpointManager, CheckpointWriteError, capture_rng_state,
                                  load_checkpoint, module_state_dict, restore_rng_state, state_dict_differences)
from tvm.train.ema import make_ema, update_ema_
from tvm.train.logging import (RunLogger, binned_means, peak_memory_gb, reset_peak_memory, sanitize_config,
                               status_line)
from tvm.train.preemption import PreemptionHandler, ignore_interrupts
from tvm.train.sharding import (broadcast_parameters_, check_sharding_supported, full_state_dict, gather_module,
                                gradient_norm, is_sharded, local, shard_network, shard_optimizer_state,
                                shard_state_dict, state_memory_per_rank)
from tvm.train.stats import StatsCollector

PEAK_FLOPS = {"cuda": 800e12}  # bf16 dense peak used for MFU (measured on the lent H100)


class NonFiniteLossError(RuntimeError):
    """Raised when non-finite losses/gradients exceed the configured policy."""


@dataclass
class Progress:
    step: int = 0         # optimizer steps done
    skipped: int = 0      # steps skipped for non-finite values
    in_row: int = 0       # consecutive skipped steps at the last check

    def state_dict(self, batch_size: int, steps_per_tick: int) -> dict[str, int]:
        return {"step": self.step, "nimg": self.step * batch_size, "tick": self.step // steps_per_tick,
                "skipped": self.skipped, "in_row": self.in_row}


@dataclass
class Batching:
    """How a global batch is split: ``batch = world · batch_gpu · rounds`` (TVM.md §5.1 item 7)."""

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
            raise ValueError(f"training.batch_size={batch} is not divisible by world size × batch_gpu "
                             f"= {world} × {batch_gpu}")
        return cls(batch, world, batch_gpu, per_rank // batch_gpu)

    def positions(self, rank: int, round_: int) -> torch.Tensor:
        """Positions in the global batch of this rank's micro-batch: the sampler gives rank r the
        stream positions ``r, r + W, …``, so round j holds ``r + W·(j·b + m)``, m < b."""
        return rank + self.world * (round_ * self.batch_gpu + torch.arange(self.batch_gpu))


def take(draws: StepDraws, index: torch.Tensor) -> StepDraws:
    return StepDraws(*(getattr(draws, f)[index.to(getattr(draws, f).device)]
                       for f in ("t", "s", "s_prime", "beta", "noise", "drop")))


def resolve_run_dir(cfg: DictConfig) -> Path:
    """One run, one directory: ``run_dir`` or ``<outputdir>/<name>``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.outputdir) / cfg.name


def set_backend_flags(cfg: DictConfig) -> None:
    """TF32 and cuDNN flags (TVM.md §3.9)."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cudnn.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cudnn.benchmark = cfg.training.cudnn_benchmark


def infinite_batches(loader: torch.utils.data.DataLoader):
    while True:
        yield from loader


def forward_flops(model: torch.nn.Module) -> float:
    """FLOPs of one forward per image: 2 per multiply-add of the token-wise layers (patch embed,
    qkv, proj, fc1, fc2, final linear) times the tokens, plus attention's 4·T²·D per block.
    Per-image layers (embedders, adaLN) are negligible and left out. DiT-XL/2 at 256 px: 236 GFLOP."""
    T = model.x_embedder.num_patches
    token_params = model.x_embedder.proj.weight.numel() + model.final_layer.linear.weight.numel()
    for block in model.blocks:
        token_params += sum(layer.weight.numel() for layer in
                            (block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2))
    return 2 * token_params * T + 4 * T * T * model.hidden_size * len(model.blocks)


def step_flops(net: TVMWrapper, batch: int) -> float:
    """≈ 11 forward-equivalents per image (JVP ≈ 3, teacher 2, FM forward 1, backward ≈ 5);
    2.6 TFLOP per image for DiT-XL/2 at 256 px."""
    return 11 * forward_flops(net.model) * batch


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


def checkpoint_content(state: RunState, cfg: DictConfig, batch: int, steps_per_tick: int,
                       data: dict[str, int]) -> dict[str, Any]:
    """Everything to resume exactly. The data position is ``step · batch`` (the sampler's global
    stream index) and each step's draws derive from (seed, step); the global RNG states are kept
    for anything else that draws (e.g. dropout).

    Sharded (FSDP2) runs call this on every rank: weights and optimizer moments are all-gathered
    into full tensors kept on rank 0 (the file is the one a DDP run writes)."""
    full = (lambda sd: full_state_dict(sd, distributed.is_main())) if state.sharded else (lambda sd: sd)
    return {"net": full(module_state_dict(state.net)), "ema": full(module_state_dict(state.ema)),
            "ema_target": full(module_state_dict(state.teacher)), "optimizer": full(state.optimizer.state_dict()),
            "progress": state.progress.state_dict(batch, steps_per_tick),
            "sampler": {"index": state.progress.step * batch}, "rng": capture_rng_state(),
            "config": sanitize_config(to_container(cfg)), "data": data}


def _weights_mismatch(module: torch.nn.Module, weights: dict[str, Any]) -> str:
    """What differs between a module and a state dict: the first key of each kind and the counts."""
    own = module.state_dict()
    missing, unexpected, shapes = state_dict_differences(own, weights)
    parts = []
    if shapes:
        key = shapes[0]
        parts.append(f"{key} is {list(weights[key].shape)} in the checkpoint but {list(own[key].shape)} here"
                     + (f" ({len(shapes)} keys differ in shape)" if len(shapes) > 1 else ""))
    if missing:
        parts.append(f"{len(missing)} keys missing, e.g. {missing[0]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {unexpected[0]}")
    return "; ".join(parts)


def _config_differences(stored: Any, cfg: DictConfig | None, section: str = "network") -> list[str]:
    """``network.<key>: <stored> in the checkpoint, <current> here`` for every differing key of a section."""
    if cfg is None or not isinstance(stored, dict) or not isinstance(stored.get(section), dict):
        return []
    current = to_container(cfg).get(section) or {}
    return [f"{section}.{key}: {stored[section].get(key)!r} in the checkpoint, {value!r} here"
            for key, value in current.items() if key in stored[section] and stored[section][key] != value]


def restore(state: RunState, ckpt: dict[str, Any], weights_only: bool, path: Path | str = "<checkpoint>",
            cfg: DictConfig | None = None) -> None:
    """Load a checkpoint into the run (``weights_only``: fine-tuning transfer of the EMA weights).

    Weights of another model size or data shape raise ``CheckpointError`` naming ``path``, the
    first mismatching parameter and the ``network.*`` settings that differ from ``cfg``.
    """
    def load(module: torch.nn.Module, name: str) -> None:
        try:
            module.load_state_dict(shard_state_dict(ckpt[name], module) if state.sharded else ckpt[name])
        except RuntimeError as exc:
            differences = _config_differences(ckpt.get("config"), cfg)
            raise CheckpointError(
                f"{path}: its {name!r} weights do not fit the network this run builds "
                f"({_weights_mismatch(module, ckpt[name]) or str(exc).splitlines()[0]})"
                + (f"; config differences: {', '.join(differences)}" if differences else "")
                + "; it was written for another model size or data shape: use the config it was trained with, "
                "or another run directory") from exc

    if weights_only:
        for module in (state.net, state.ema, state.teacher):
            load(module, "ema")
        return
    load(state.net, "net")
    load(state.ema, "ema")
    load(state.teacher, "ema_target")
    try:
        state.optimizer.load_state_dict(shard_optimizer_state(ckpt["optimizer"], state.optimizer) if state.sharded
                                        else ckpt["optimizer"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"{path}: its optimizer state does not fit this run's optimizer ({exc})") from exc
    progress = ckpt["progress"]
    state.progress = Progress(progress["step"], progress.get("skipped", 0), progress.get("in_row", 0))
    if "rng" in ckpt:
        restore_rng_state(ckpt["rng"])


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the final progress and last metrics (for tests).

    However the run ends, an exception included, the signal handlers it replaced are restored and
    its log is closed, with the error as its last line (a process that outlives a failed run, e.g.
    submitit's job runner, must not keep ignoring SIGTERM/SIGUSR2).
    """
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, cleanup)


def _log_error(logger: RunLogger) -> Callable[..., None]:
    """An ``ExitStack`` exit callback that writes the exception ending the run to the log (best effort)."""
    def log(kind: type[BaseException] | None, error: BaseException | None, _traceback: Any) -> None:
        if kind is not None:
            with contextlib.suppress(Exception):  # e.g. the disk that is full also holds log.txt
                logger.log(f"run stopped by {kind.__name__}: {error}")
    return log


def _run(cfg: DictConfig, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """The body of :func:`run`; ``cleanup`` undoes what must not outlive the run."""
    # ---------------------------------------------------------------- set-up
    validate_config(cfg)
    dist = distributed.init_distributed()
    device = dist.device
    set_backend_flags(cfg)
    tcfg = cfg.training
    batching = Batching.from_config(tcfg.batch_size, tcfg.batch_gpu, dist.world_size)
    steps_per_tick = max(1, round(tcfg.kimg_per_tick * 1000 / tcfg.batch_size))
    total_steps = tcfg.total_ticks * steps_per_tick
    if tcfg.max_steps is not None:
        total_steps = min(total_steps, tcfg.max_steps)
    if cfg.network.data_type == "fp16":
        raise ValueError("network.data_type=fp16 is not supported for training (it needs loss scaling); use bf16 "
                         "on GPUs or fp32")
    if tcfg.resume and tcfg.transfer:
        raise ValueError("training.resume and training.transfer are mutually exclusive")
    seed = distributed.shared_seed(tcfg.seed)
    run_dir = resolve_run_dir(cfg)

    dataset = build_dataset(cfg.dataset)
    encoder = encoder_from_config(cfg.encoder)
    channels = encoder.latent_channels(dataset.num_channels)
    vae_on_pixels = channels == 4 and dataset.num_channels == 3  # latents are 8x smaller than RGB
    resolution = dataset.resolution // 8 if vae_on_pixels else dataset.resolution
    label_dim = dataset.label_dim if cfg.dataset.use_labels else 0
    data_facts = {"resolution": resolution, "channels": channels, "label_dim": label_dim}
    for metric in tcfg.metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} in training.metrics; allowed: {', '.join(METRICS)}")
    if "fid50k_full" in tcfg.metrics and not cfg.eval.ref_stats:
        raise ValueError("training.metrics has fid50k_full but eval.ref_stats is not set (reference statistics, "
                         "e.g. dataset-refs/img256.pkl or one made by scripts/ref_stats.py)")

    ncfg = cfg.network
    check_sharding_supported(ncfg.sharding, ncfg.jvp_mode, ncfg.compile_scope, ncfg.compile, ncfg.recompute,
                             dist.distributed, ncfg.compile_mode)
    sharded = ncfg.sharding == "fsdp2"
    torch.manual_seed(seed)
    net = build_network(ncfg, resolution, channels, label_dim, device)
    # DDP broadcasts rank 0's weights; the EMAs are copies made after that (TVM.md §1.5). FSDP2:
    # the same broadcast, then the network and both EMAs are sharded alike (tvm/train/sharding.py).
    if sharded:
        broadcast_parameters_(net)
        ema, teacher = make_ema(net), make_ema(net)
        shard_network(net)
        for module in (ema, teacher):  # called through velocity() inside the loss, not forward()
            shard_network(module, methods=("velocity",))
        ddp = net
    else:
        ddp = DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None) \
            if dist.distributed else net
        ema, teacher = make_ema(net), make_ema(net)
    state = RunState(net, ema, teacher, build_optimizer(cfg.optimizer, net.parameters(), device), Progress())
    teacher = state.teacher if tcfg.ema_target_beta is not None else None
    ckpts = CheckpointManager(run_dir, keep_last=tcfg.keep_last,
                              snapshot_every_steps=tcfg.snapshot_ticks * steps_per_tick)
    resumed_from = None
    if tcfg.transfer:
        restore(state, load_checkpoint(tcfg.transfer, require=("ema",)), True, tcfg.transfer, cfg)
    elif tcfg.resume:
        resumed_from = Path(tcfg.resume)
        restore(state, load_checkpoint(resumed_from, require=("net", "ema", "ema_target", "optimizer")), False,
                resumed_from, cfg)
    elif (found := ckpts.load_latest()) is not None:
        resumed_from, ckpt = found
        restore(state, ckpt, False, resumed_from, cfg)
    progress = state.progress
    if resumed_from is not None and progress.step >= total_steps:  # nothing to train; config.yaml stays as it is
        return _already_finished(progress, total_steps, resumed_from, run_dir, batching.batch, steps_per_tick)
    compile_cache = run_dir / COMPILE_CACHE if cfg.network.compile and cfg.network.compile_cache else None
    if compile_cache is not None:
        loaded_artifacts = load_compile_cache(compile_cache)
    train_net = _compiled(ddp, state, cfg.network) if cfg.network.compile else ddp

    sampler = _make_sampler(len(dataset), dist, seed, progress.step * batching.batch)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=batching.batch_gpu, sampler=sampler, num_workers=cfg.dataloader.num_workers,
        pin_memory=cfg.dataloader.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.dataloader.prefetch_factor if cfg.dataloader.num_workers > 0 else None,
        persistent_workers=cfg.dataloader.num_workers > 0, worker_init_fn=ignore_interrupts)
    batches = infinite_batches(loader)

    # Secrets come from the environment only; a value that reached the config (e.g. through
    # ${oc.env:WANDB_API_KEY}) is redacted from everything written or sent (TVM.md §5.8).
    logger = RunLogger(run_dir, dist.rank, wandb_mode=str(cfg.logger.mode), project=sanitize_config(cfg.logger.project),
                       entity=sanitize_config(cfg.logger.entity), run_name=sanitize_config(cfg.name),
                       config_dict=to_container(cfg))
    cleanup.callback(logger.close)
    cleanup.push(_log_error(logger))
    if dist.is_main:
        (run_dir / "config.yaml").write_text(sanitize_config(OmegaConf.to_yaml(cfg)))
    total, trainable = count_parameters(net.model)
    logger.log(f"run dir {run_dir}; {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); world "
               f"{dist.world_size} × batch_gpu {batching.batch_gpu} × {batching.rounds} rounds = {batching.batch}; "
               f"{steps_per_tick} steps/tick; steps {progress.step} → {total_steps}; {ncfg.sharding}: weights, "
               f"gradients, AdamW and EMAs {state_memory_per_rank(total, dist.world_size, ncfg.sharding) / 2**30:.2f} "
               "GiB per rank (computed)"
               + (f"; resumed from {resumed_from}" if resumed_from else ""))
    times, guide = time_sampling(cfg.loss), guidance(cfg.loss)
    sample_shape = (channels, resolution, resolution)
    stats = StatsCollector(device)
    skipped_dev = torch.zeros((), device=device)       # non-finite steps since the last check
    in_row_dev = torch.full((), float(progress.in_row), device=device)
    longest_dev = in_row_dev.clone()                   # longest run of skipped steps since the last check
    metric_ctx = MetricContext(encoder=encoder, device=device, seed=cfg.eval.seed,
                               batch_size=max(1, cfg.eval.batch_size // dist.world_size),
                               num_images=cfg.eval.num_images, label_mode=cfg.eval.label_mode,
                               class_probs=_class_frequencies(dataset) if cfg.eval.label_mode == "empirical" else None,
                               detector_url=cfg.eval.detector_url, ref_stats=cfg.eval.ref_stats,
                               **extra_metric_fields(cfg.eval))
    check_reference_files(tcfg.metrics, net, metric_ctx)  # a wrong file fails now, not at the first evaluation
    flops = step_flops(net, batching.batch)
    peak = PEAK_FLOPS.get(device.type)
    preempt = PreemptionHandler(device=device).install()
    cleanup.callback(preempt.uninstall)
    last_metrics: dict[str, float] = {}
    def eval_ema() -> TVMWrapper:
        """The eval EMA to sample and evaluate with: an unsharded copy when sharded (collective)."""
        if not sharded:
            return state.ema
        return gather_module(state.ema, build_network(ncfg, resolution, channels, label_dim, device, init=False)
                             ).eval().requires_grad_(False)

    if progress.step == 0 and tcfg.no_eval_before_tick <= 0 and tcfg.metrics:
        last_metrics = _evaluate(eval_ema(), cfg, metric_ctx, logger, 0)
    preempted = False
    bar = logger.progress(total_steps, initial=progress.step)
    tick_start, tick_step0, run_start = time.time(), progress.step, time.time()

    # ---------------------------------------------------------------- the loop
    while progress.step < total_steps:
        if cfg.network.compile:  # CUDA graphs (compile_mode=reduce-overhead): a new step may reuse their outputs
            torch.compiler.cudagraph_mark_step_begin()
        gen = distributed.step_generator(seed, progress.step, device)
        draws = draw_step(gen, batching.batch, sample_shape, times, guide, device)
        net.train()
        nonfinite_loss = torch.zeros((), device=device)
        for round_ in range(batching.rounds):
            images, labels = next(batches)
            x = encoder.encode(images.to(device, non_blocking=True), generator=gen)
            labels = labels.to(device) if label_dim else None
            mine = take(draws, batching.positions(dist.rank, round_))
            last_round = round_ == batching.rounds - 1
            with _gradient_sync(ddp, sharded, dist.distributed, last_round):
                terms = train_net(x, labels, mine, teacher if teacher is not None else net)
                loss = terms["loss"]
                nonfinite_loss = torch.maximum(nonfinite_loss, (~torch.isfinite(loss)).any().float())
                (loss.sum() * (dist.world_size / batching.batch)).backward()
            stats.report_binned("Loss/terminal_loss", terms["terminal"].detach(), mine.t.flatten())
            stats.report_binned("Loss/fm_loss", terms["fm"].detach(), mine.t.flatten())
        distributed.all_reduce_max_(nonfinite_loss)
        skip = apply_update(state, tcfg.max_grad_norm, tcfg.ema_beta, tcfg.ema_target_beta, nonfinite_loss, stats)
        skipped_dev += skip.float()
        in_row_dev = (in_row_dev + 1) * skip.float()
        torch.maximum(longest_dev, in_row_dev, out=longest_dev)
        progress.step += 1
        bar.update(1)

        preempted = preempt.should_stop(progress.step, tcfg.preempt_check_steps)
        done = progress.step >= total_steps or preempted
        if progress.step % steps_per_tick and not done:
            continue

        # ------------------------------------------------------------ maintenance (end of a tick)
        tick = progress.step // steps_per_tick
        maint_start = time.time()
        counts = torch.stack((skipped_dev, in_row_dev, longest_dev)).tolist()  # the tick's one host sync for them
        skipped, progress.in_row, longest = (int(v) for v in counts)
        progress.skipped += skipped
        skipped_dev.zero_()
        longest_dev.copy_(in_row_dev)
        summary = stats.summarize()
        steps_done = progress.step - tick_step0
        elapsed = maint_start - tick_start
        img_per_sec = steps_done * batching.batch / max(elapsed, 1e-9)
        mfu = flops * steps_done / max(elapsed, 1e-9) / (peak * dist.world_size) if peak else None
        losses = {"terminal": binned_means(summary, "Loss/terminal_loss"), "fm": binned_means(summary, "Loss/fm_loss")}
        logger.log(status_line(tick=tick, kimg=progress.step * batching.batch / 1e3, step=progress.step,
                               sec_per_kimg=elapsed / max(steps_done * batching.batch / 1e3, 1e-9),
                               img_per_sec=img_per_sec, peak_mem_gb=peak_memory_gb(device), losses=losses, mfu=mfu,
                               total_sec=time.time() - run_start, sec_per_tick=elapsed)
                   + (f" skipped {progress.skipped}" if progress.skipped else ""))
        logger.log_stats(summary, progress.step, tick=tick, img_per_sec=img_per_sec, skipped_steps=progress.skipped,
                         **({"mfu": mfu} if mfu is not None else {}))
        reset_peak_memory(device)
        _check_nonfinite(tcfg, progress, longest)

        if tick % tcfg.ckpt_ticks == 0 or done:
            _save_checkpoint(ckpts, lambda: checkpoint_content(state, cfg, batching.batch, steps_per_tick, data_facts),
                             progress.step, collective=sharded)
        grids = tcfg.do_log_image and (tick % tcfg.sample_ticks == 0 or done) and not preempted
        evaluate = bool(tcfg.metrics) and not preempted and tick >= tcfg.no_eval_before_tick \
            and (tick % tcfg.eval_ticks == 0 or done)
        ema_now = eval_ema() if grids or evaluate else None
        if grids:
            _save_sample_grids(ema_now, encoder, cfg, run_dir, tick, logger, device)
        if evaluate:
            last_metrics = _evaluate(ema_now, cfg, metric_ctx, logger, progress.step)
        del ema_now
        if compile_cache is not None and distributed.is_main():
            _update_compile_cache(compile_cache, loaded_artifacts, logger)
            compile_cache = None  # once per process: the training graphs exist after the first tick
        distributed.barrier()
        tick_start, tick_step0 = time.time(), progress.step
        if preempted:
            logger.log(f"stopping at step {progress.step} on {preempt.signal_name}: checkpoint written, "
                       "the job can be requeued and will resume from it")
            break
    bar.close()
    preempt.uninstall()
    logger.close()
    return {"progress": progress.state_dict(batching.batch, steps_per_tick), "metrics": last_metrics,
            "run_dir": str(run_dir), "preempted": preempted,
            "signal": preempt.signal_name if preempted else None}


def _already_finished(progress: Progress, total_steps: int, checkpoint: Path, run_dir: Path, batch: int,
                      steps_per_tick: int) -> dict[str, Any]:
    """The result of a run whose checkpoint is at or past ``total_steps``; rank 0 says so."""
    if distributed.is_main():
        print(f"run already finished: {checkpoint} is at step {progress.step} >= total {total_steps} "
              f"(training.total_ticks × {steps_per_tick} steps/tick, or training.max_steps); nothing to do. "
              "Raise training.total_ticks to train on, or set another run_dir for a new run.", flush=True)
    return {"progress": progress.state_dict(batch, steps_per_tick), "metrics": {}, "run_dir": str(run_dir),
            "preempted": False, "signal": None, "already_finished": True}


# ------------------------------------------------------------------------------ step helpers

def _class_frequencies(dataset) -> np.ndarray:
    """Label frequencies of the training set (upstream's FID label distribution, TVM.md §7.1)."""
    counts = sum(dataset.get_label(i) for i in range(len(dataset)))
    return counts / counts.sum()


def _make_sampler(length: int, dist: distributed.DistContext, seed: int, start: int):
    from tvm.data.datasets import InfiniteSampler

    return InfiniteSampler(length, rank=dist.rank, world_size=dist.world_size, seed=seed, start_index=start)


def grad_norm_and_skip(net: TVMWrapper, max_norm: float | None, nonfinite_loss: torch.Tensor,
                       stats: StatsCollector | None = None) -> torch.Tensor:
    """Gradient norm (after the DDP all-reduce, so equal on all ranks), optional clipping, and the
    skip flag ``non-finite loss on any rank or non-finite gradient`` as a 0-dim bool tensor."""
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    if grads and is_sharded(grads[0]):  # FSDP2: norms of the local slices, summed over the ranks
        norm, grads = gradient_norm(grads), [local(g) for g in grads]
    else:
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if max_norm is not None:
        torch._foreach_mul_(grads, torch.clamp(max_norm / (norm + 1e-6), max=1.0))
    if stats is not None:
        stats.report("Loss/grad_norm", norm.detach().reshape(1))
    return (~torch.isfinite(norm)) | (nonfinite_loss > 0)


def _gradient_sync(module: torch.nn.Module, sharded: bool, distributed: bool, sync: bool
                   ) -> contextlib.AbstractContextManager:
    """Gradient synchronisation of one accumulation round: only the last round (``sync``) reduces
    (DDP: ``no_sync`` before it; FSDP2: ``set_requires_gradient_sync``)."""
    if sharded:
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    return module.no_sync() if distributed and not sync else contextlib.nullcontext()


def _compiled(ddp: torch.nn.Module, state: RunState, network: DictConfig) -> torch.nn.Module:
    """The training forward under ``torch.compile`` (``network.compile_scope``): ``blocks`` compiles
    each DiT block of the online net, the teacher and the EMA in place (regional compilation);
    ``full`` compiles the whole DDP-wrapped loss forward. The compiled graphs keep
    ``network.compile_memory_budget`` of their activations for the backward.

    Every input shape gets its own static graph: with Dynamo's automatic dynamic shapes, a call at
    another batch size first (an evaluation at step 0, say) would make the training graphs
    dynamic in the batch, whose partition keeps more for the backward (DiT-XL/2 at budget 0.7:
    41.3 instead of 31.3 GiB, docs/benchmarks.md).
    """
    scope, mode = network.compile_scope, str(network.get("compile_mode", "default"))  # checked by the schema
    options = {} if mode == "default" else {"mode": mode}
    set_activation_memory_budget(network.compile_memory_budget)
    torch._dynamo.config.automatic_dynamic_shapes = False
    if scope == "full":
        if hasattr(torch._dynamo.config, "optimize_ddp"):  # gone in newer PyTorch, which splits no DDP graph
            torch._dynamo.config.optimize_ddp = False  # one graph for forward and backward, as upstream
        return compile_model(ddp, **options)
    for wrapper in (state.net, state.teacher):
        wrapper.model.compile_blocks(**options)
    # The eval EMA samples in loops that feed a block's output back in; CUDA graph trees overwrite
    # such outputs on the next replay (measured: "accessing tensor output of CUDAGraphs that has been
    # overwritten"), so it never uses reduce-overhead.
    state.ema.model.compile_blocks(**({} if mode == "reduce-overhead" else options))
    return ddp


def apply_update(state: RunState, max_grad_norm: float | None, ema_beta: float, ema_target_beta: float | None,
                 nonfinite_loss: torch.Tensor, stats: StatsCollector | None = None) -> torch.Tensor:
    """Clip, AdamW (skipped on device by fused AdamW's ``found_inf`` when non-finite), then the eval
    EMA and the teacher EMA in that order (TVM.md §5.2 items 5–9). Returns the skip flag."""
    skip = grad_norm_and_skip(state.net, max_grad_norm, nonfinite_loss, stats)
    state.optimizer.found_inf = skip.float()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    update_ema_(state.ema, state.net, ema_beta, skip)
    if ema_target_beta is not None:
        update_ema_(state.teacher, state.net, ema_target_beta, skip)
    return skip


COMPILE_CACHE = "compile-cache.bin"


def _update_compile_cache(path: Path, loaded: int, logger: RunLogger) -> None:
    """Rank 0 writes the artifacts compiled so far when there are more than the file held; a failure
    to write is logged, never fatal (the cache only saves compile time at the next start)."""
    try:
        written = save_compile_cache(path) if not loaded else 0
    except OSError as exc:
        logger.log(f"compile cache not written ({exc}); the next start compiles from scratch")
        return
    logger.log(f"compile cache: {loaded} artifacts loaded at start" if loaded else
               f"compile cache: {written} artifacts written to {path}; a restart loads them")


def _check_nonfinite(tcfg: DictConfig, progress: Progress, longest_in_row: int = 0) -> None:
    """The non-finite policy, checked once per tick (one host sync). ``longest_in_row`` is the longest
    run of consecutive skipped steps since the last check: a run of K in mid-tick followed by good
    steps must stop the run too, not only K in a row at the end of the tick."""
    if tcfg.nonfinite_policy == "raise" and progress.skipped:
        raise NonFiniteLossError(f"{progress.skipped} step(s) had non-finite losses or gradients by step "
                                 f"{progress.step} (training.nonfinite_policy=raise); nothing was applied")
    in_row = max(progress.in_row, longest_in_row)
    if in_row >= tcfg.max_nonfinite_in_row:
        raise NonFiniteLossError(f"{in_row} consecutive steps had non-finite losses or gradients "
                                 f"(limit training.max_nonfinite_in_row={tcfg.max_nonfinite_in_row}) by step "
                                 f"{progress.step}; the weights, EMAs and checkpoints hold no NaN")


def _save_checkpoint(ckpts: CheckpointManager, content: Callable[[], dict[str, Any]], step: int,
                     collective: bool = False) -> None:
    """Rank 0 writes the checkpoint of ``step``; a failure there (disk full, unwritable directory) is
    raised on every rank alike, so that no rank waits at the next collective until the process-group
    timeout. The previous checkpoint stays intact (atomic write). One small collective per checkpoint."""
    error: Exception | None = None
    gathered = content() if collective else None  # sharded runs: every rank joins the all-gathers
    if distributed.is_main():
        try:
            ckpts.save(gathered if collective else content(), step)
        except Exception as exc:  # noqa: BLE001 - re-raised below, after the other ranks have been told
            error = exc
    path = ckpts.path_for(step)
    distributed.raise_on_every_rank(error, lambda message, errno: CheckpointWriteError(
        f"rank 0 could not write checkpoint {path}: {message}", path, errno))


def _save_sample_grids(ema: TVMWrapper, encoder, cfg: DictConfig, run_dir: Path, tick: int, logger: RunLogger,
                       device: torch.device) -> None:
    """PNG grids from fixed noise and classes at every configured sampler (rank 0)."""
    if not distributed.is_main():
        return
    n = cfg.training.num_samples
    num_classes = ema.model.num_classes
    classes = [i % num_classes for i in range(n)] if num_classes else None
    for name, sampler_cfg in cfg.sampling.items():
        images = generate_images(ema, encoder, list(range(n)), steps=sampler_cfg.num_steps,
                                 guidance=sampler_cfg.cfg_scale, seed=cfg.eval.seed, classes=classes, device=device)
        path = save_image_grid(images, run_dir / "samples" / f"{name}-tick{tick:06d}.png",
                               cols=min(n, num_classes) if num_classes else None,
                               upscale=max(1, 64 // images.shape[-1]))
        logger.log_images(f"samples/{name}", path, tick)


def _evaluate(ema: TVMWrapper, cfg: DictConfig, ctx: MetricContext, logger: RunLogger, step: int) -> dict[str, float]:
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
