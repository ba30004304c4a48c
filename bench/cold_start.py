"""Cold start of a training run: seconds from ``bash train.sh 1 CONFIG`` to the first finished step.

    PYTHONPATH=. python bench/cold_start.py [--config im256_w2] [--batch 32] [overrides ...]

Runs the real entry point on a synthetic latent dataset (random ``[8, R/8, R/8]`` posterior
moments with labels, written to a temporary folder in the EDM layout) with the config's model,
precision and compilation, one step per tick, no metrics and no sample grids, and reports the
time from starting ``train.sh`` until the first tick line (step 1 done; it is printed after a
host sync) appears in its output. The process is then stopped (except the first start's, which
goes on to write its checkpoint and the compile cache).
Three starts, as a user meets them:

* ``cold``: empty Inductor/Triton caches and an empty run directory (a first run on a new node);
* ``run-dir cache``: empty Inductor/Triton caches again, but the run directory holds the
  ``compile-cache.bin`` the first run wrote (a preempted job requeued on another node);
* ``local cache``: the first run's Inductor/Triton caches, ``network.compile_cache=false``
  (a restart on the same node).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
FIRST_TICK = re.compile(r"\btick 1\b.*\bstep 1\b")


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
    """Seconds from start until the first tick line; the process group is then stopped, or with
    ``wait`` left to finish (writing its checkpoint and compile cache)."""
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        elapsed = None
        try:
            for line in proc.stdout:
                out.write(line)
                if FIRST_TICK.search(line) and elapsed is None:
                    elapsed = time.perf_counter() - start
                    if not wait:
                        break
                if time.perf_counter() - start > limit_s:
                    break
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="im256_w2")
    parser.add_argument("--batch", type=int, default=32, help="global batch = per-GPU batch (one GPU)")
    parser.add_argument("--resolution", type=int, default=256, help="image resolution (latents are 1/8)")
    parser.add_argument("--starts", default="cold,run-dir cache,local cache")
    parser.add_argument("--limit", type=float, default=400.0, help="give up on a start after this many seconds")
    parser.add_argument("--keep", default=None, help="copy the logs here")
    args, overrides = parser.parse_known_args()

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
        "training.max_steps=1",
        "training.metrics=[]",
        "training.do_log_image=false",
        "training.no_eval_before_tick=1000000",
        *overrides,
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    first_caches = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-1"), "TRITON_CACHE_DIR": str(tmp / "triton-1")}
    fresh_caches = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor-2"), "TRITON_CACHE_DIR": str(tmp / "triton-2")}
    results = []
    for start in args.starts.split(","):
        run_dir = tmp / f"run-{start.replace(' ', '-')}"
        run_dir.mkdir()
        extra = []
        if start == "cold":
            caches = first_caches
        elif start == "run-dir cache":
            caches = fresh_caches
            if not (tmp / "run-cold" / "compile-cache.bin").exists():
                print("# skipping the run-dir cache start: the cold start wrote no cache", flush=True)
                continue
            shutil.copy(tmp / "run-cold" / "compile-cache.bin", run_dir / "compile-cache.bin")
        elif start == "local cache":
            caches, extra = first_caches, ["network.compile_cache=false"]
        else:
            raise SystemExit(f"unknown start {start!r}")
        seconds = time_to_first_step(
            base + [f"run_dir={run_dir}", *extra],
            dict(env, **caches),
            tmp / f"{run_dir.name}.log",
            args.limit,
            wait=start == "cold",
        )
        if start == "cold":
            cache = run_dir / "compile-cache.bin"
            print(
                f"# cold start wrote {cache.stat().st_size / 2**20:.1f} MiB to compile-cache.bin"
                if cache.exists()
                else "# cold start wrote no compile-cache.bin",
                flush=True,
            )
        results.append((start, seconds))
        print(f"# {start}: {seconds if seconds is None else f'{seconds:.1f} s'}", flush=True)
        if seconds is None:
            print((tmp / f"{run_dir.name}.log").read_text()[-3000:], file=sys.stderr)
    print("| start | seconds to the first finished step |\n|---|---|")
    for start, seconds in results:
        print(f"| {start} | {'not reached' if seconds is None else f'{seconds:.1f}'} |")
    if args.keep:
        shutil.copytree(
            tmp, args.keep, ignore=shutil.ignore_patterns("data", "inductor-*", "triton-*", "*.pt"), dirs_exist_ok=True
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
