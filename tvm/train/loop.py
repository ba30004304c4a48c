"""The TVM training loop (docs/method.md §5). Reads top to bottom: set-up, then one step, then the
maintenance at the end of each tick. Its pieces live beside it: the run's length, state and checkpoints
in tvm/train/state.py, the batch split and the update step in tvm/train/update.py, what the run logs,
samples and evaluates in tvm/train/report.py, the compile policy in tvm/compiling.py, sharding in
tvm/train/sharding.py.

What differs from upstream, on purpose (docs/method.md §11):

* real gradient accumulation (``batch_gpu`` < batch/world gives the full-batch gradient);
* each loss term's backward on its own where ``training.split_backward`` is set (the shipped configs;
  upstream runs one backward of the sum): the same gradient to fp32 rounding, a lower peak memory
  (:func:`tvm.train.update.loss_and_backward`);
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
import functools
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from tvm.compiling import (
    COMPILE_CACHE,
    KERNEL_CACHE,
    compile_training,
    load_compile_cache,
    update_compile_cache,
    use_kernel_cache,
    uses_cuda_graphs,
)
from tvm.config import validate_config
from tvm.eval.grid import save_reference_grid
from tvm.eval.metrics import MetricContext, check_metric_names, check_reference_files
from tvm.method.times import StepDraws, draw_step
from tvm.method.wrapper import TVMWrapper
from tvm.models.dit import count_parameters
from tvm.runtime import distributed
from tvm.runtime.build import (
    build_dataset,
    build_network,
    check_fp8_training_supported,
    encoder_from_config,
    guidance,
    time_sampling,
    training_batches,
)
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint
from tvm.runtime.stats import StatsCollector
from tvm.train.preemption import PreemptionHandler, ignore_interrupts
from tvm.train.report import TickMeter, evaluate, log_error_on_exit, open_run_logger, save_sample_grids
from tvm.train.sharding import check_sharding_supported, gather_module, state_memory_per_rank
from tvm.train.startup import StartupClock
from tvm.train.step_graph import StepGraph, check_cuda_graph_supported
from tvm.train.state import (
    Schedule,
    already_finished,
    build_run_state,
    checkpoint_content,
    find_resume_checkpoint,
    replaces_initialisation,
    restore,
    save_checkpoint,
)
from tvm.train.update import (
    Batching,
    NonFiniteCounter,
    apply_update,
    check_nonfinite,
    gradient_sync,
    loss_and_backward,
    step_flops,
    take,
)


def resolve_run_dir(cfg: DictConfig) -> Path:
    """One run, one directory: ``run_dir`` or ``<outputdir>/<name>``."""
    return Path(cfg.run_dir) if cfg.run_dir else Path(cfg.outputdir) / cfg.name


def set_backend_flags(cfg: DictConfig) -> None:
    """TF32 and cuDNN flags (docs/method.md §3.9)."""
    torch.backends.cuda.matmul.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cudnn.allow_tf32 = cfg.training.enable_tf32
    torch.backends.cuda.matmul.allow_fp16_reduced_precision_reduction = False
    torch.backends.cudnn.benchmark = cfg.training.cudnn_benchmark


def run(cfg: DictConfig) -> dict[str, Any]:
    """Train as configured; returns the final progress and last metrics (for tests).

    However the run ends, an exception included, the signal handlers it replaced are restored and
    its log is closed, with the error as its last line (a process that outlives a failed run, e.g.
    submitit's job runner, must not keep ignoring SIGTERM/SIGUSR2).
    """
    with contextlib.ExitStack() as cleanup:
        return _run(cfg, cleanup)


def _run(cfg: DictConfig, cleanup: contextlib.ExitStack) -> dict[str, Any]:
    """The body of :func:`run`; ``cleanup`` undoes what must not outlive the run."""
    # ---------------------------------------------------------------- set-up
    startup = StartupClock()
    validate_config(cfg)
    dist = distributed.init_distributed()
    device = dist.device
    set_backend_flags(cfg)
    tcfg, ncfg = cfg.training, cfg.network
    batching = Batching.from_config(tcfg.batch_size, tcfg.batch_gpu, dist.world_size)
    schedule = Schedule.from_config(tcfg)
    steps_per_tick, total_steps = schedule.steps_per_tick, schedule.total_steps
    seed = distributed.shared_seed(tcfg.seed)
    run_dir = resolve_run_dir(cfg)

    dataset = build_dataset(cfg.dataset)
    encoder = encoder_from_config(cfg.encoder)
    channels, resolution, _ = encoder.latent_shape(dataset.image_shape)
    label_dim = dataset.label_dim if cfg.dataset.use_labels else 0
    data_facts = {"resolution": resolution, "channels": channels, "label_dim": label_dim}
    check_metric_names(tcfg.metrics, cfg.eval.ref_stats, "training.metrics")
    sharded = ncfg.sharding == "fsdp2"
    check_sharding_supported(
        ncfg.sharding,
        ncfg.jvp_mode,
        ncfg.compile_scope,
        ncfg.compile,
        ncfg.recompute,
        dist.distributed,
        ncfg.compile_mode,
    )
    check_fp8_training_supported(ncfg, device)
    if tcfg.cuda_graph:
        check_cuda_graph_supported(device, dist.distributed, ncfg.sharding, ncfg.compile, ncfg.compile_mode)
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
    state, ddp = build_run_state(cfg, (resolution, channels, label_dim), dist, init)
    net = state.net
    teacher = state.teacher if tcfg.ema_target_beta is not None else None  # None: the online net is its own teacher
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
    compile_cache = run_dir / COMPILE_CACHE if ncfg.compile and ncfg.compile_cache else None
    if compile_cache is not None:
        loaded_artifacts = load_compile_cache(compile_cache)
        cleanup.callback(use_kernel_cache, use_kernel_cache(run_dir / KERNEL_CACHE))
    train_net = compile_training(ddp, state.net, state.teacher, state.ema, ncfg) if ncfg.compile else ddp
    cuda_graphs = ncfg.compile and uses_cuda_graphs(ncfg.compile_mode)
    startup.mark("compile cache")

    batches = training_batches(
        cfg.dataloader, dataset, batching.batch_gpu, dist, seed, progress.step * batching.batch, ignore_interrupts
    )
    logger = open_run_logger(cfg, run_dir, dist.rank)
    cleanup.callback(logger.close)
    cleanup.push(log_error_on_exit(logger))
    total, trainable = count_parameters(net.model)
    logger.log(
        f"run dir {run_dir}; {total / 1e6:.2f}M parameters ({trainable / 1e6:.2f}M trainable); world "
        f"{dist.world_size} × batch_gpu {batching.batch_gpu} × {batching.rounds} rounds = {batching.batch}; "
        f"{steps_per_tick} steps/tick; steps {progress.step} → {total_steps}"
        + (f"; resumed from {resumed_from}" if resumed_from else "")
        + f"; {ncfg.sharding}: weights, gradients, AdamW and EMAs "
        f"{state_memory_per_rank(total, dist.world_size, str(ncfg.sharding)) / 2**30:.2f} GiB per rank (computed)"
        + ("; the blocks' linear layers train as FP8 GEMMs (network.fp8)" if ncfg.fp8 else "")
    )
    if tcfg.do_log_image and dist.is_main:  # real training images, decoded like the samples, beside their grids
        reference = save_reference_grid(
            dataset, encoder, run_dir / "samples", tcfg.num_samples, label_dim, device, cfg.eval.seed
        )
        logger.log_images("samples/reference", reference, progress.step)
    times, guide = time_sampling(cfg.loss), guidance(cfg.loss)
    sample_shape = (channels, resolution, resolution)
    stats = StatsCollector(device)
    nonfinite = NonFiniteCounter(progress, device)
    metric_ctx = MetricContext.from_config(cfg, encoder, device, dist.world_size, dataset)
    check_reference_files(tcfg.metrics, net, metric_ctx)  # a wrong file fails now, not at the first evaluation
    preempt = PreemptionHandler(device=device).install()
    cleanup.callback(preempt.uninstall)
    last_metrics: dict[str, float] = {}

    def eval_ema() -> TVMWrapper:
        """The eval EMA to sample and evaluate with: an unsharded copy when sharded (collective)."""
        if not sharded:
            return state.ema
        plain = build_network(ncfg, resolution, channels, label_dim, device, init=False)
        return gather_module(state.ema, plain).eval().requires_grad_(False)

    if progress.step == 0 and tcfg.no_eval_before_tick <= 0 and tcfg.metrics:
        last_metrics = evaluate(eval_ema(), cfg, metric_ctx, logger, 0)
    preempted = False
    bar = logger.progress(total_steps, initial=progress.step)
    meter = TickMeter(progress.step, step_flops(net, batching.batch), device, dist.world_size)
    startup.mark("other set-up")

    def round_sync(last_round: bool, last: bool) -> contextlib.AbstractContextManager:
        """The gradient sync of a backward: all-reduce after the step's last one only (DDP)."""
        return gradient_sync(ddp, sharded, dist.distributed, last_round and last)

    def train_step(parts: list[tuple[torch.Tensor, torch.Tensor | None, StepDraws]]) -> dict[str, torch.Tensor]:
        """One optimizer step on this rank's micro-batches ``(x, labels, draws)``: the tensors the loop
        reports (per-sample terms ``[rounds, b]``, gradient norm, skip flag). No host sync, so that
        ``training.cuda_graph`` can capture it whole."""
        nonfinite_loss = torch.zeros((), device=device)
        terms = []
        for round_, (x, labels, mine) in enumerate(parts):
            last_round = round_ == len(parts) - 1
            terms.append(
                loss_and_backward(
                    train_net,
                    teacher if teacher is not None else net,
                    x,
                    labels,
                    mine,
                    dist.world_size / batching.batch,
                    functools.partial(round_sync, last_round),
                    tcfg.split_backward,
                    ncfg.compile_memory_budget_fm if ncfg.compile else None,
                )
            )
            nonfinite_loss = torch.maximum(nonfinite_loss, (~torch.isfinite(terms[-1]["loss"])).any().float())
        distributed.all_reduce_max_(nonfinite_loss)
        update = apply_update(state, tcfg.max_grad_norm, tcfg.ema_beta, tcfg.ema_target_beta, nonfinite_loss)
        return {
            "terminal": torch.stack([t["terminal"] for t in terms]),
            "fm": torch.stack([t["fm"] for t in terms]),
            "grad_norm": update.grad_norm,
            "skip": update.skip,
        }

    step = StepGraph(train_step, optimizers=[state.optimizer]) if tcfg.cuda_graph else train_step

    # ---------------------------------------------------------------- the loop
    while progress.step < total_steps:
        if cuda_graphs:  # a new step: CUDA graph trees may reuse the previous step's outputs
            torch.compiler.cudagraph_mark_step_begin()
        gen = distributed.step_generator(seed, progress.step, device)
        draws = draw_step(gen, batching.batch, sample_shape, times, guide, device)
        net.train()
        parts = []
        for round_ in range(batching.rounds):
            images, labels = next(batches)
            x = encoder.encode(images.to(device, non_blocking=True), generator=gen)
            labels = labels.to(device) if label_dim else None
            parts.append((x, labels, take(draws, batching.positions(dist.rank, round_))))
        out = step(parts)
        for round_, (_, _, mine) in enumerate(parts):
            stats.report_binned("Loss/terminal_loss", out["terminal"][round_], mine.t.flatten())
            stats.report_binned("Loss/fm_loss", out["fm"][round_], mine.t.flatten())
        stats.report("Loss/grad_norm", out["grad_norm"].reshape(1))
        nonfinite.record(out["skip"])
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
        meter.stop()
        longest_in_row = nonfinite.sync(progress)
        meter.report(logger, stats, tick, progress.step, batching.batch, progress.skipped)
        check_nonfinite(tcfg, progress, longest_in_row)

        if tick % tcfg.ckpt_ticks == 0 or done:
            save_checkpoint(
                ckpts,
                lambda: checkpoint_content(state, cfg, batching.batch, steps_per_tick, data_facts),
                progress.step,
                collective=sharded,
            )
        grids_due = tcfg.do_log_image and (tick % tcfg.sample_ticks == 0 or done) and not preempted
        metrics_due = (
            bool(tcfg.metrics)
            and not preempted
            and tick >= tcfg.no_eval_before_tick
            and (tick % tcfg.eval_ticks == 0 or done)
        )
        ema_now = eval_ema() if grids_due or metrics_due else None
        if grids_due:
            assert ema_now is not None
            save_sample_grids(ema_now, encoder, cfg, run_dir, tick, logger)
        if metrics_due:
            assert ema_now is not None
            last_metrics = evaluate(ema_now, cfg, metric_ctx, logger, progress.step)
        del ema_now
        if compile_cache is not None and distributed.is_main():
            update_compile_cache(compile_cache, loaded_artifacts, logger.log)
            compile_cache = None  # once per process: the training graphs exist after the first tick
        distributed.barrier()
        meter.start(progress.step)
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
