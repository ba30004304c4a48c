"""DDP on several GPUs of one host against one GPU, with the real model (DiT-XL/2, im256_w2).

    PYTHONPATH=. python bench/ddp.py --gpus 2 [--batch-gpu 32] [--ticks 6]

Makes a synthetic latent dataset (EDM format: 8-channel posterior mean‖std ``.npy`` files with
labels) so that no download is needed, then trains with ``train.py`` through torchrun twice with
the same global batch ``gpus × batch_gpu``: on one GPU with gradient accumulation
(``training.batch_gpu``) and on ``--gpus`` GPUs. The step's random draws and the data order are
global, so the two runs compute the same losses up to bf16/reduction-order rounding. Prints the
per-tick losses of both runs, their relative difference, and the img/s per GPU (weak scaling:
the per-GPU batch is the same in both runs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def make_latent_dataset(path: Path, n: int, resolution: int = 32, classes: int = 1000, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    path.mkdir(parents=True, exist_ok=True)
    labels = []
    for i in range(n):
        mean = rng.normal(0.5, 4.0, (4, resolution, resolution)).astype(np.float32)
        std = np.exp(rng.normal(-2.0, 0.3, (4, resolution, resolution))).astype(np.float32)
        name = f"{i // 1000:05d}/img-mean-std-{i:08d}.npy"
        (path / name).parent.mkdir(exist_ok=True)
        np.save(path / name, np.concatenate([mean, std]))
        labels.append([name, int(rng.integers(classes))])
    (path / "dataset.json").write_text(json.dumps({"labels": labels}))
    return path


def train(
    run_dir: Path, data: Path, nproc: int, batch: int, batch_gpu: int, ticks: int, steps_per_tick: int
) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        str(ROOT / "train.py"),
        "--config-name=im256_w2",
        f"dataset.path={data}",
        f"run_dir={run_dir}",
        f"training.batch_size={batch}",
        f"training.batch_gpu={batch_gpu}",
        f"training.kimg_per_tick={batch * steps_per_tick / 1000}",
        f"training.total_ticks={ticks}",
        "training.metrics=[]",
        "training.do_log_image=false",
        "training.ckpt_ticks=100000",
        "training.keep_last=1",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    return [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]


def mean_loss(stats: dict, name: str) -> float:
    values = [v for k, v in stats.items() if k.startswith(f"Loss/{name}_q") and v is not None]
    return float(np.mean(values))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=2)
    parser.add_argument("--batch-gpu", type=int, default=32)
    parser.add_argument("--ticks", type=int, default=6)
    parser.add_argument("--steps-per-tick", type=int, default=4)
    parser.add_argument("--images", type=int, default=512)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tvm-ddp-"))
    data = make_latent_dataset(work / "latents", args.images)
    batch = args.gpus * args.batch_gpu
    runs = {
        n: train(work / f"gpus{n}", data, n, batch, args.batch_gpu, args.ticks, args.steps_per_tick)
        for n in (1, args.gpus)
    }
    one, many = runs[1], runs[args.gpus]
    print(f"| tick | terminal 1 GPU | terminal {args.gpus} GPUs | fm 1 GPU | fm {args.gpus} GPUs | rel. diff fm |")
    print("|---|---|---|---|---|---|")
    for a, b in zip(one, many):
        fa, fb = mean_loss(a, "fm_loss"), mean_loss(b, "fm_loss")
        print(
            f"| {a['tick']} | {mean_loss(a, 'terminal_loss'):.5f} | {mean_loss(b, 'terminal_loss'):.5f} | "
            f"{fa:.5f} | {fb:.5f} | {abs(fa - fb) / abs(fa):.2e} |"
        )
    # The first tick includes compilation/autotuning; use the later ones for throughput.
    ips1 = float(np.median([s["img_per_sec"] for s in one[1:]]))
    ipsn = float(np.median([s["img_per_sec"] for s in many[1:]]))
    print(f"# global batch {batch}; per-GPU batch {args.batch_gpu}; 1 GPU uses {args.gpus} accumulation rounds")
    print(
        f"# img/s per GPU: 1 GPU {ips1:.1f}, {args.gpus} GPUs {ipsn / args.gpus:.1f} "
        f"→ weak-scaling efficiency {ipsn / args.gpus / ips1:.1%}"
    )


if __name__ == "__main__":
    main()
