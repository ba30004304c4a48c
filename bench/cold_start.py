"""Cold start of a training run: seconds from ``bash train.sh 1 CONFIG`` to the first finished step.

    PYTHONPATH=. python bench/cold_start.py [--config im256_w2] [--batch 32] [--limit S] [overrides ...]

Runs the real entry point on a synthetic latent dataset (random ``[8, R/8, R/8]`` posterior
moments with labels, written to a temporary folder in the EDM layout) with the config's model,
precision and compilation, one step per tick, no metrics and no sample grids, and reports the
time from starting ``train.sh`` until the first tick line (the step done; it is printed after a
host sync) appears in its output, with the run's own start-up line (tvm/train/startup.py: set-up,
checkpoint read, build, restore, compile cache, other set-up, first step) split into columns;
"before run()" is the rest: the launcher, Python's start and the imports.
Three starts, as a user meets them:

* ``cold``: empty Inductor/Triton caches and an empty run directory (a first run on a new node); it
  trains step 1 and is left to finish, writing its checkpoint, ``compile-cache.bin`` and
  ``triton-cache/`` (our attention kernels' binaries and autotuning results);
* ``run-dir cache``: empty Inductor/Triton caches again, in a copy of the cold start's run directory
  (a preempted job requeued on another node): it resumes from the step-1 checkpoint (without the
  weight initialisation) with the compile cache and the kernel cache, and trains step 2;
* ``local cache``: the cold start's Inductor/Triton caches, in another copy of its run directory with
  ``network.compile_cache=false`` (a restart on the same node, without the run directory's caches: our
  kernels, which the cold start kept in its run directory only, are compiled and tuned again).

Each start is stopped after its first tick line (except the cold one, see above) or after its limit:
by default 270 s for the cold start (its first step and the writing of its ≈ 13.6 GB checkpoint at
DiT-XL/2) and 150 s for each of the others, 570 s in all, so that the three fit in one 600 s
device call; ``--limit S`` sets one limit for every start.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tvm.train.startup import PHASES, PREFIX, parse_startup_line

REPO = Path(__file__).resolve().parent.parent
FIRST_TICK = re.compile(r"\btick \d+\s+step \d+\b")
LIMITS = {"cold": 270.0, "run-dir cache": 150.0, "local cache": 150.0}  # seconds; 570 s in all
# Inductor's and Triton's caches: "<kind>-1" for the cold and the local-cache starts, "<kind>-2" (empty) for the other.
CACHE_DIRS = {"TORCHINDUCTOR_CACHE_DIR": "inductor", "TRITON_CACHE_DIR": "triton"}


def write_latent_dataset(folder: Path, count: int, latent: int, classes: int = 1000, seed: int = 0) -> None:
    """``count`` random posterior-moment arrays ``[8, latent, latent]`` (mean ‖ std, std > 0) + labels."""
    rng = np.random.default_rng(seed)
    (folder / "00000").mkdir(parents=True)
    labels = []
    for i in range(count):
        name = f"00000/img{i:08d}.npy"
        mean = rng.standard_normal((4, latent, latent), dtype=np.float32) * 4
        std = np.exp(rng.uniform(-3, -1, (4, latent, latent))).astype(np.float32)
        np.save(folder / name, np.concatenate([mean, std]))
        labels.append([name, int(rng.integers(classes))])
    (folder / "dataset.json").write_text(json.dumps({"labels": labels}))


def time_to_first_step(
    command: list[str], env: dict[str, str], log: Path, limit_s: float, wait: bool = False
) -> float | None:
    """Seconds from start until the first tick line (None: not reached within ``limit_s``); the process
    group is then stopped, or with ``wait`` left to finish (writing its checkpoint and caches) until
    ``limit_s`` has passed since the start, whether or not it prints anything."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        watchdog = threading.Timer(limit_s, kill_group, (proc.pid,))
        watchdog.start()
        elapsed = None
        try:
            for line in proc.stdout:
                out.write(line)
                if elapsed is None and FIRST_TICK.search(line):
                    elapsed = time.perf_counter() - start
                    if not wait:
                        break
        finally:
            watchdog.cancel()
            kill_group(proc.pid)
            proc.wait()
    return elapsed


def kill_group(pid: int) -> None:
    """SIGKILL the process group led by ``pid`` (train.sh, torchrun and its workers), if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def copy_run_dir(source: Path, target: Path) -> None:
    """A requeued job's run directory: ``source``'s files, checkpoints hard-linked (≈ 13.6 GB at DiT-XL/2)."""
    shutil.copytree(source, target, copy_function=_link_or_copy)


def _link_or_copy(src: str, dst: str) -> None:
    if src.endswith(".pt"):
        os.link(src, dst)
    else:
        shutil.copy2(src, dst)


def start_settings(start: str, tmp: Path) -> tuple[Path, dict[str, str], list[str]] | None:
    """Run directory, cache environment and extra overrides of one start (None: it cannot run, because
    the cold start left no checkpoint to resume from)."""
    run_dir = tmp / f"run-{start.replace(' ', '-')}"
    caches = {name: str(tmp / f"{kind}-{1 if start != 'run-dir cache' else 2}") for name, kind in CACHE_DIRS.items()}
    if start == "cold":
        run_dir.mkdir()
        return run_dir, caches, ["training.max_steps=1"]
    cold_dir = tmp / "run-cold"
    if not list(cold_dir.glob("checkpoint-*.pt")):
        return None
    copy_run_dir(cold_dir, run_dir)
    extra = ["training.max_steps=2"]  # resumes from step 1 and trains step 2
    return run_dir, caches, extra + (["network.compile_cache=false"] if start == "local cache" else [])


def table(results: list[tuple[str, float | None, dict[str, float] | None]]) -> str:
    """The Markdown table: seconds to the first finished step, then where they went (start-up line)."""
    lines = [
        "| start | seconds to the first finished step | before run() | " + " | ".join(PHASES) + " |",
        "|---" * (3 + len(PHASES)) + "|",
    ]
    for start, seconds, phases in results:
        if seconds is None:
            cells = ["not reached"] + ["-"] * (1 + len(PHASES))
        else:
            phases = phases or {}
            outside = f"{seconds - phases['total']:.1f}" if "total" in phases else "-"
            cells = [f"{seconds:.1f}", outside] + [f"{phases[p]:.1f}" if p in phases else "-" for p in PHASES]
        lines.append(f"| {start} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="im256_w2")
    parser.add_argument("--batch", type=int, default=32, help="global batch = per-GPU batch (one GPU)")
    parser.add_argument("--resolution", type=int, default=256, help="image resolution (latents are 1/8)")
    parser.add_argument("--starts", default=",".join(LIMITS))
    parser.add_argument(
        "--limit",
        type=float,
        default=None,
        help="give up on every start after this many seconds (default: "
        + ", ".join(f"{start} {limit:.0f}" for start, limit in LIMITS.items())
        + ")",
    )
    parser.add_argument("--keep", default=None, help="copy the logs here")
    args, overrides = parser.parse_known_args()
    starts = args.starts.split(",")
    unknown = [start for start in starts if start not in LIMITS]
    if unknown:
        raise SystemExit(f"unknown start(s) {unknown}; known: {', '.join(LIMITS)}")

    tmp = Path(tempfile.mkdtemp(prefix="tvm-cold-start-"))
    write_latent_dataset(tmp / "data", 2 * args.batch, args.resolution // 8)
    base = [
        "bash",
        str(REPO / "train.sh"),
        "1",
        args.config,
        f"dataset.path={tmp / 'data'}",
        f"training.batch_size={args.batch}",
        f"training.kimg_per_tick={args.batch / 1000}",
        "training.metrics=[]",
        "training.do_log_image=false",
        "training.no_eval_before_tick=1000000",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    results = []
    for start in starts:
        settings = start_settings(start, tmp)
        if settings is None:
            print(f"# skipping the {start} start: it resumes from the cold start's checkpoint, and there is none")
            continue
        run_dir, caches, extra = settings
        log = tmp / f"{run_dir.name}.log"
        seconds = time_to_first_step(
            base + [f"run_dir={run_dir}", *extra],
            dict(env, **caches),
            log,
            LIMITS[start] if args.limit is None else args.limit,
            wait=start == "cold",
        )
        if start == "cold":
            report_cold_start_files(run_dir)
        else:
            shutil.rmtree(run_dir, ignore_errors=True)  # its partly written checkpoint: the disk is needed
        text = log.read_text()
        results.append((start, seconds, parse_startup_line(text)))
        print(f"# {start}: {seconds if seconds is None else f'{seconds:.1f} s'}", flush=True)
        for line in text.splitlines():
            if line.startswith(PREFIX):
                print(f"# {start}: {line}", flush=True)
        if seconds is None:
            print(text[-3000:], file=sys.stderr)
    print(table(results))
    if args.keep:
        shutil.copytree(
            tmp, args.keep, ignore=shutil.ignore_patterns("data", "inductor-*", "triton-*", "*.pt"), dirs_exist_ok=True
        )
    shutil.rmtree(tmp, ignore_errors=True)


def report_cold_start_files(run_dir: Path) -> None:
    """What the cold start left for the next starts: compile cache, kernel cache, checkpoint."""
    cache, kernels = run_dir / "compile-cache.bin", run_dir / "triton-cache"
    kernel_bytes = sum(p.stat().st_size for p in kernels.rglob("*") if p.is_file()) if kernels.is_dir() else 0
    checkpoints = list(run_dir.glob("checkpoint-*.pt"))
    print(
        "# cold start wrote "
        + (f"{cache.stat().st_size / 2**20:.1f} MiB to compile-cache.bin" if cache.exists() else "no compile-cache.bin")
        + f", {kernel_bytes / 2**20:.1f} MiB to triton-cache/ "
        f"({len(list(kernels.rglob('*.autotune.json'))) if kernels.is_dir() else 0} autotuning results)"
        + (f", {checkpoints[0].name}" if checkpoints else ", no checkpoint"),
        flush=True,
    )


if __name__ == "__main__":
    main()
