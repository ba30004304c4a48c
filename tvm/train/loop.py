"""The TVM training loop (docs/method.md §5). Reads top to bottom: set-up, then one step, then the
maintenance at the end of each tick. Its pieces live beside it: the run state and its checkpoints
in tvm/train/state.py, the batch split and the update step in tvm/train/update.py, the compile
policy in tvm/compiling.py, sharding in tvm/train/sharding.py.

What differs from upstream, on purpose (docs/method.md §11):

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
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.nn.parallel import DistributedDataParallel

from tvm.compiling import (
    COMPILE_CACHE,
    KERNEL_CACHE,
    compile_training,
    load_compile_cache,
    update_compile_cache,
    use_kernel_cache,
    uses_cuda_graphs,
)
from tvm.config import to_container, validate_config
from tvm.eval.generate import generate_images
from tvm.eval.grid import grid_classes, grid_layout, save_image_grid, save_reference_grid
from tvm.eval.metrics import METRICS, MetricContext, check_reference_files, compute_metric
from tvm.method.times import draw_step
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import count_parameters
from tvm.runtime import distributed
from tvm.runtime.build import (
    build_dataset,
    build_network,
    build_optimizer,
    encoder_from_config,
    guidance,
    time_sampling,
)
from tvm.runtime.checkpoint import CheckpointManager, CheckpointWriteError, load_checkpoint
from tvm.train.ema import make_ema
from tvm.runtime.run_logging import (
    RunLogger,
    binned_means,
    peak_memory_gb,
    reset_peak_memory,
    sanitize_config,
    status_line,
)
from tvm.train.preemption import PreemptionHandler, ignore_interrupts
from tvm.train.sharding import (
    broadcast_parameters_,
    check_sharding_supported,
    gather_module,
    shard_run,
    state_memory_per_rank,
)
from tvm.train.startup import StartupClock
from tvm.train.state import (
    Progress,
    RunState,
    already_finished,
    checkpoint_content,
    find_resume_checkpoint,
    replaces_initialisation,
    restore,
)
from tvm.runtime.stats import StatsCollector
from tvm.train.update import Batching, apply_update, check_nonfinite, gradient_sync, step_flops, take

PEAK_FLOPS = {"cuda": 800e12}  # bf16 dense peak used for MFU (measured on the lent H100)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """One run, one directory: ``run_dir`` or ``<outputdir>/<name>``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.outputdir) / cfg.name


def set_backend_flags(cfg: DictConfig) -> None:
    """TF32 and cuDNN flags (docs/method.md §3.9)."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cudnn.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cudnn.benchmark = cfg.training.cudnn_benchmark


def infinite_batches(loader: torch.utils.data.DataLoader):
    while True:
        yield from loader


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
    startup = StartupClock()
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
        raise ValueError(
            "network.data_type=fp16 is not supported for training (it needs loss scaling); use bf16 on GPUs or fp32"
        )
    if tcfg.resume and tcfg.transfer:
        raise ValueError("training.resume and training.transfer are mutually exclusive")
    seed = distributed.shared_seed(tcfg.seed)
    run_dir = resolve_run_dir(cfg)

    dataset = build_dataset(cfg.dataset)
    encoder = encoder_from_config(cfg.encoder)
    channels, resolution, _ = encoder.latent_shape(dataset.image_shape)
    label_dim = dataset.label_dim if cfg.dataset.use_labels else 0
    data_facts = {"resolution": resolution, "channels": channels, "label_dim": label_dim}
    for metric in tcfg.metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} in training.metrics; allowed: {', '.join(METRICS)}")
    if "fid50k_full" in tcfg.metrics and not cfg.eval.ref_stats:
        raise ValueError(
            "training.metrics has fid50k_full but eval.ref_stats is not set (reference statistics, "
            "e.g. dataset-refs/img256.pkl or one made by scripts/ref_stats.py)"
        )

    ncfg = cfg.network
    check_sharding_supported(
        ncfg.sharding,
        ncfg.jvp_mode,
        ncfg.compile_scope,
        ncfg.compile,
        ncfg.recompute,
        dist.distributed,
        ncfg.compile_mode,
    )
    sharded = ncfg.sharding == "fsdp2"
    ckpts = CheckpointManager(
        run_dir, keep_last=tcfg.keep_last, snapshot_every_steps=tcfg.snapshot_ticks * steps_per_tick
    )
    startup.mark("set-up")
    resume = None if tcfg.transfer else find_resume_checkpoint(tcfg.resume, ckpts)  # (path, content)
    resumed_from = None if resume is None else resume[0]
    startup.mark("checkpoint read")
    # A checkpoint that replaces every weight and the RNG states makes the initialisation moot: skip it.
    init = not replaces_initialisation(None if resume is None else resume[1])
    torch.manual_seed(seed)
    net = build_network(ncfg, resolution, channels, label_dim, device, init=init)
    # DDP broadcasts rank 0's weights; the EMAs are copies made after that (docs/method.md §1.5). FSDP2:
    # the same broadcast, then the network and both EMAs are sharded alike (tvm/train/sharding.py).
    ddp: torch.nn.Module
    teacher: TVMWrapper | None  # None below when the online network is its own teacher
    if sharded:
        broadcast_parameters_(net)
        ema, teacher = make_ema(net), make_ema(net)
        shard_run(net, ema, teacher)
        ddp = net
    else:
        ddp = (
            DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
            if dist.distributed
            else net
        )
        ema, teacher = make_ema(net), make_ema(net)
    state = RunState(net, ema, teacher, build_optimizer(cfg.optimizer, net.parameters(), device), Progress())
    teacher = state.teacher if tcfg.ema_target_beta is not None else None
    startup.mark("build", "weights initialised" if init else "initialisation skipped: the checkpoint replaces it")
    if tcfg.transfer:
        restore(state, load_checkpoint(tcfg.transfer, require=("ema",)), True, tcfg.transfer, cfg)
    elif resume is not None:
        restore(state, resume[1], False, resume[0], cfg)
    del resume  # the host copy of the weights and moments is not needed any more
    startup.mark("restore")
    progress = state.progress
    if resumed_from is not None and progress.step >= total_steps:  # nothing to train; config.yaml stays as it is
        return already_finished(progress, total_steps, resumed_from, run_dir, batching.batch, steps_per_tick)
    compile_cache = run_dir / COMPILE_CACHE if cfg.network.compile and cfg.network.compile_cache else None
    if compile_cache is not None:
        loaded_artifacts = load_compile_cache(compile_cache)
        cleanup.callback(use_kernel_cache, use_kernel_cache(run_dir / KERNEL_CACHE))
    train_net = compile_training(ddp, state.net, state.teacher, state.ema, ncfg) if ncfg.compile else ddp
    cuda_graphs = ncfg.compile and uses_cuda_graphs(ncfg.compile_mode)
    startup.mark("compile cache")

    sampler = _make_sampler(len(dataset), dist, seed, progress.step * batching.batch)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=batching.batch_gpu,
        sampler=sampler,
        num_workers=cfg.dataloader.num_workers,
        pin_memory=cfg.dataloader.pin_memory and device.type == "cuda",
        prefetch_factor=cfg.dataloader.prefetch_factor if cfg.dataloader.num_workers > 0 else None,
        persistent_workers=cfg.dataloader.num_workers > 0,
        worker_init_fn=ignore_interrupts,
    )
    batches = infinite_batches(loader)

    # Secrets come from the environment only; a value that reached the config (e.g. through
    # ${oc.env:WANDB_API_KEY}) is redacted from everything written or sent (docs/method.md §5.8).
    logger = RunLogger(
        run_dir,
        dist.rank,
        wandb_mode=str(cfg.logger.mode),
        project=sanitize_config(cfg.logger.project),
        entity=sanitize_config(cfg.logger.entity),
        run_name=sanitize_config(cfg.name),
        config_dict=to_container(cfg),
    )
    cleanup.callback(logger.close)
    cleanup.push(_log_error(logger))
    if dist.is_main:
        (run_dir / "config.yaml").write_text(sanitize_config(OmegaConf.to_yaml(cfg)))
    total, trainable = count_parameters(net.model)
    logger.log(
        f"run dir {run_dir}; {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); world "
        f"{dist.world_size} × batch_gpu {batching.batch_gpu} × {batching.rounds} rounds = {batching.batch}; "
        f"{steps_per_tick} steps/tick; steps {progress.step} → {total_steps}"
        + (f"; resumed from {resumed_from}" if resumed_from else "")
        + f"; {ncfg.sharding}: weights, gradients, AdamW and EMAs "
        f"{state_memory_per_rank(total, dist.world_size, str(ncfg.sharding)) / 2**30:.2f} "
        "GiB per rank (computed)"
    )
    if tcfg.do_log_image and dist.is_main:  # real training images, decoded like the samples, beside their grids
        logger.log_images(
            "samples/reference",
            save_reference_grid(
                dataset, encoder, run_dir / "samples", tcfg.num_samples, label_dim, device, cfg.eval.seed
            ),
            progress.step,
        )
    times, guide = time_sampling(cfg.loss), guidance(cfg.loss)
    sample_shape = (channels, resolution, resolution)
    stats = StatsCollector(device)
    skipped_dev = torch.zeros((), device=device)  # non-finite steps since the last check
    in_row_dev = torch.full((), float(progress.in_row), device=device)
    longest_dev = in_row_dev.clone()  # longest run of skipped steps since the last check
    metric_ctx = MetricContext.from_config(cfg, encoder, device, dist.world_size, dataset)
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
        return (
            gather_module(state.ema, build_network(ncfg, resolution, channels, label_dim, device, init=False))
            .eval()
            .requires_grad_(False)
        )

    if progress.step == 0 and tcfg.no_eval_before_tick <= 0 and tcfg.metrics:
        last_metrics = _evaluate(eval_ema(), cfg, metric_ctx, logger, 0)
    preempted = False
    bar = logger.progress(total_steps, initial=progress.step)
    tick_start, tick_step0, run_start = time.time(), progress.step, time.time()
    startup.mark("other set-up")

    # ---------------------------------------------------------------- the loop
    while progress.step < total_steps:
        if cuda_graphs:  # a new step: CUDA graph trees may reuse the previous step's outputs
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
            with gradient_sync(ddp, sharded, dist.distributed, last_round):
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
        if not startup.finished:  # where the start-up went, the first step (compilation) included
            if device.type == "cuda":
                torch.cuda.synchronize(device)  # the clock times finished work, not launches
            startup.mark("first step")
            logger.log(startup.line())

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
        logger.log(
            status_line(
                tick=tick,
                kimg=progress.step * batching.batch / 1e3,
                step=progress.step,
                sec_per_kimg=elapsed / max(steps_done * batching.batch / 1e3, 1e-9),
                img_per_sec=img_per_sec,
                peak_mem_gb=peak_memory_gb(device),
                losses=losses,
                mfu=mfu,
                total_sec=time.time() - run_start,
                sec_per_tick=elapsed,
            )
            + (f" skipped {progress.skipped}" if progress.skipped else "")
        )
        logger.log_stats(
            summary,
            progress.step,
            tick=tick,
            img_per_sec=img_per_sec,
            skipped_steps=progress.skipped,
            **({"mfu": mfu} if mfu is not None else {}),
        )
        reset_peak_memory(device)
        check_nonfinite(tcfg, progress, longest)

        if tick % tcfg.ckpt_ticks == 0 or done:
            _save_checkpoint(
                ckpts,
                lambda: checkpoint_content(state, cfg, batching.batch, steps_per_tick, data_facts),
                progress.step,
                collective=sharded,
            )
        grids = tcfg.do_log_image and (tick % tcfg.sample_ticks == 0 or done) and not preempted
        evaluate = (
            bool(tcfg.metrics)
            and not preempted
            and tick >= tcfg.no_eval_before_tick
            and (tick % tcfg.eval_ticks == 0 or done)
        )
        ema_now = eval_ema() if grids or evaluate else None
        if grids:
            assert ema_now is not None
            _save_sample_grids(ema_now, encoder, cfg, run_dir, tick, logger, device)
        if evaluate:
            assert ema_now is not None
            last_metrics = _evaluate(ema_now, cfg, metric_ctx, logger, progress.step)
        del ema_now
        if compile_cache is not None and distributed.is_main():
            update_compile_cache(compile_cache, loaded_artifacts, logger.log)
            compile_cache = None  # once per process: the training graphs exist after the first tick
        distributed.barrier()
        tick_start, tick_step0 = time.time(), progress.step
        if preempted:
            logger.log(
                f"stopping at step {progress.step} on {preempt.signal_name}: checkpoint written, "
                "the job can be requeued and will resume from it"
            )
            break
    bar.close()
    return {
        "progress": progress.state_dict(batching.batch, steps_per_tick),
        "metrics": last_metrics,
        "run_dir": str(run_dir),
        "preempted": preempted,
        "signal": preempt.signal_name if preempted else None,
    }


# ------------------------------------------------------------------------------ step helpers


def _make_sampler(length: int, dist: distributed.DistContext, seed: int, start: int):
    from tvm.data.datasets import InfiniteSampler

    return InfiniteSampler(length, rank=dist.rank, world_size=dist.world_size, seed=seed, start_index=start)


def _save_checkpoint(
    ckpts: CheckpointManager, content: Callable[[], dict[str, Any]], step: int, collective: bool = False
) -> None:
    """Rank 0 writes the checkpoint of ``step``; a failure there (disk full, unwritable directory) is
    raised on every rank alike, so that no rank waits at the next collective until the process-group
    timeout. The previous checkpoint stays intact (atomic write). One small collective per checkpoint."""
    error: Exception | None = None
    gathered = content() if collective else None  # sharded runs: every rank joins the all-gathers
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


def _save_sample_grids(
    ema: TVMWrapper, encoder, cfg: DictConfig, run_dir: Path, tick: int, logger: RunLogger, device: torch.device
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
            device=device,
        )
        path = save_image_grid(
            images, run_dir / "samples" / f"{name}-tick{tick:06d}.png", **grid_layout(n, num_classes, images.shape[-1])
        )
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
