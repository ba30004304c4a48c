"""Training-step throughput of DiT-XL/2 (18 heads) with the paper's settings, on one GPU.

    PYTHONPATH=. python bench/step.py [--resolution 256] [--batch 32] [--steps 8]

Builds the network on the GPU (spectral init there; the zero-initialised layers then get small
random weights so that every path carries signal), and times, with CUDA events after warm-up:

* the full TVM step — loss with its JVP, teacher forward, backward, gradient norm (+ clipping at
  512 px), fused AdamW, eval-EMA and teacher-EMA updates (``tvm.train.loop.apply_update``) — for
  each JVP attention backend (the Triton kernel and the math reference);
* a plain flow-matching step of the same model (one forward, backward, the same update);
* 1-step generation at batch 256 (network only, no VAE decode).

It first checks that the Triton path computes the same loss and gradients as the math path
(bf16 autocast, small batch). FLOPs: one forward of the token-wise layers plus attention
(``tvm.train.loop.forward_flops``; 236 GFLOP per image at 256 px); a TVM step counts 11 forward
equivalents per image, a flow-matching step 3. MFU uses ``--peak`` (800 TFLOP/s, the bf16 rate
measured on the lent H100).
"""
from __future__ import annotations

import argparse
import datetime
import statistics

import torch
import triton

from tvm.config import compose_config
from tvm.method.loss import interpolate
from tvm.method.sampler import sample
from tvm.method.times import draw_step
from tvm.train.build import build_network, build_optimizer, guidance, time_sampling
from tvm.train.ema import make_ema
from tvm.train.loop import Progress, RunState, apply_update, forward_flops


def build_state(cfg, resolution: int, jvp_backend: str, seed: int = 0) -> RunState:
    torch.manual_seed(seed)
    cfg.network.jvp_attn_backend = jvp_backend
    net = build_network(cfg.network, resolution, 4, 1000, device="cuda")
    with torch.no_grad():  # give the zero-initialised layers signal
        for name, p in net.named_parameters():
            if p.requires_grad and torch.count_nonzero(p) == 0:
                p.normal_(0, 0.02)
    return RunState(net, make_ema(net), make_ema(net), build_optimizer(cfg.optimizer, net.parameters(), "cuda"),
                    Progress())


def batch(n: int, resolution: int, seed: int):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(n, 4, resolution, resolution, device="cuda", generator=gen)
    labels = torch.nn.functional.one_hot(torch.randint(0, 1000, (n,), device="cuda", generator=gen), 1000).float()
    return x, labels


def tvm_step(state: RunState, cfg, x, labels, step: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(step)
    draws = draw_step(gen, x.shape[0], tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
    loss = state.net(x, labels, draws, state.teacher)["loss"]
    loss.mean().backward()
    apply_update(state, cfg.training.max_grad_norm, cfg.training.ema_beta, cfg.training.ema_target_beta,
                 (~torch.isfinite(loss)).any().float())
    return loss.detach()


def fm_step(state: RunState, cfg, x, labels, step: int) -> torch.Tensor:
    gen = torch.Generator(device="cuda").manual_seed(step)
    draws = draw_step(gen, x.shape[0], tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
    x_t = interpolate(x, draws.noise, draws.t)
    F = state.net.velocity(x_t, draws.t, torch.zeros_like(draws.t), labels, draws.beta)
    loss = ((F - (draws.noise - x)) ** 2).flatten(1).mean(1)
    loss.mean().backward()
    apply_update(state, cfg.training.max_grad_norm, cfg.training.ema_beta, cfg.training.ema_target_beta,
                 (~torch.isfinite(loss)).any().float())
    return loss.detach()


def time_steps(fn, warmup: int, steps: int) -> list[float]:
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(steps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(warmup + i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def grads_of(state: RunState) -> torch.Tensor:
    return torch.cat([p.grad.float().flatten() for p in state.net.parameters() if p.grad is not None])


def check_backends(cfg, resolution: int, n: int = 4) -> dict[str, float]:
    """Relative difference of loss and gradients, Triton vs math JVP attention, same weights/draws."""
    out = {}
    x, labels = batch(n, resolution, 1)
    results = {}
    for backend in ("math", "triton"):
        state = build_state(cfg, resolution, backend)
        gen = torch.Generator(device="cuda").manual_seed(7)
        draws = draw_step(gen, n, tuple(x.shape[1:]), time_sampling(cfg.loss), guidance(cfg.loss), "cuda")
        loss = state.net(x, labels, draws, state.teacher)["loss"]
        loss.mean().backward()
        results[backend] = (loss.detach(), grads_of(state))
        del state
    (l_m, g_m), (l_t, g_t) = results["math"], results["triton"]
    out["loss_rel"] = float((l_t - l_m).norm() / l_m.norm())
    out["grad_rel"] = float((g_t - g_m).norm() / g_m.norm())
    return out


def measure(kind: str, backend: str, cfg, R: int, x: torch.Tensor, labels: torch.Tensor, args) -> list[tuple]:
    """Table rows for one step kind (``tvm`` or ``fm``) and JVP attention backend; OOM is a row too."""
    state = build_state(cfg, R, backend if backend != "-" else "math")
    step = tvm_step if kind == "tvm" else fm_step
    torch.cuda.reset_peak_memory_stats()
    try:
        times = time_steps(lambda i: step(state, cfg, x, labels, i), args.warmup, args.steps)
    except torch.OutOfMemoryError:
        return [(kind, backend, None, None, None, None)]
    ms = statistics.median(times)
    flops = (11 if kind == "tvm" else 3) * forward_flops(state.net.model) * args.batch
    rows = [(kind, backend, ms, args.batch / ms * 1e3, flops / (ms / 1e3) / args.peak,
             torch.cuda.max_memory_allocated() / 2**30)]
    if kind == "tvm" and backend == "triton":
        z = torch.randn(args.sample_batch, 4, R, R, device="cuda")
        lab = torch.nn.functional.one_hot(torch.randint(0, 1000, (args.sample_batch,), device="cuda"), 1000).float()
        gen_ms = statistics.median(triton.testing.do_bench(lambda: sample(state.ema, z, lab, 1, 2.0),
                                                           warmup=50, rep=300, return_mode="all"))
        rows.append(("1-step gen", f"batch {args.sample_batch}", gen_ms, args.sample_batch / gen_ms * 1e3, None, None))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=256, help="image resolution (256 or 512)")
    parser.add_argument("--batch", type=int, default=32, help="per-GPU batch")
    parser.add_argument("--steps", type=int, default=8, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--backends", default="triton,math", help="JVP attention backends to time")
    parser.add_argument("--peak", type=float, default=800e12, help="peak FLOP/s for MFU")
    parser.add_argument("--no-check", action="store_true", help="skip the Triton-vs-math check")
    parser.add_argument("--sample-batch", type=int, default=256, help="batch of the 1-step generation timing")
    args = parser.parse_args()

    config = "im256_w2" if args.resolution == 256 else "im512_w2p25"
    cfg = compose_config(config)
    R = args.resolution // 8
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; config {config}, latent {R}x{R}, "
          f"batch {args.batch}")
    if not args.no_check:
        print("# check (bf16, batch 4): Triton vs math JVP attention:", check_backends(cfg, R))

    rows = []
    x, labels = batch(args.batch, R, 0)
    for kind, backend in [("tvm", b) for b in args.backends.split(",")] + [("fm", "-")]:
        rows += measure(kind, backend, cfg, R, x, labels, args)
        torch.cuda.empty_cache()
    with torch.device("meta"):
        gflops = forward_flops(build_network(cfg.network, R, 4, 1000, "meta", init=False).model) / 1e9

    print("| step | JVP attention | ms/step | img/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for kind, backend, ms, ips, mfu, mem in rows:
        if ms is None:
            print(f"| {kind} | {backend} | OOM | | | |")
            continue
        print(f"| {kind} | {backend} | {ms:.1f} | {ips:.1f} | {'' if mfu is None else f'{mfu:.1%}'} | "
              f"{'' if mem is None else f'{mem:.1f}'} |")
    tvm = {b: ms for k, b, ms, *_ in rows if k == "tvm" and ms}
    fm = next((ms for k, _, ms, *_ in rows if k == "fm" and ms), None)
    if fm:
        print("# TVM/plain step-time ratio:", {b: round(v / fm, 2) for b, v in tvm.items()})
    print(f"# forward FLOPs per image {gflops:.0f} GFLOP; TVM step = 11, FM step = 3 forward equivalents")


if __name__ == "__main__":
    main()
