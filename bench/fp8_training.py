"""Does the tiny DiT train and sample as well with FP8 GEMMs? CPU evidence at small scale (Rounds 16 and 17):

    PYTHONPATH=. python bench/fp8_training.py [--seeds 0,1] [--ticks 10]

Per seed, runs the embedded default (configs/tiny.yaml: DiT-S/2 layout, hidden 64, 4 blocks, the digits, 1,000
steps of batch 64, fp32 on the CPU) as configured and with ``network.fp8=true`` (the blocks' qkv, proj, fc1 and fc2
as FP8 GEMMs in forward, tangent and backward; tvm/models/fp8.py; on a CPU ``torch._scaled_mm`` computes the same
roundings), and evaluates each run's final checkpoint twice, sampled without and with FP8 GEMMs (``eval.fp8``).
Prints each row's last-tick losses (from ``stats.jsonl``: each term's mean over the tick, averaged over its four
time bins) and gradient norm, and the digits metrics of the final eval EMA at 1, 2 and 4 sampling steps on 1,000
samples (the Fréchet distance to the real training digits in pixel space, and an RBF SVM's accuracy on
class-conditional samples; tvm/eval/small.py). A few minutes per training run on 2 cores.

Small scale only: it says whether the rounding stops a small model from learning or sampling, not what it costs
DiT-XL/2 on ImageNet latents (which needs GPU runs and FID).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tvm.config import compose_config
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.runtime.checkpoint import CheckpointManager
from tvm.train.loop import run


def last_tick_losses(run_dir: Path) -> dict[str, float]:
    """The run's last tick (``stats.jsonl``'s last training record): each loss term averaged over its four time bins
    (``Loss/<term>_q0`` … ``_q3``), and the gradient norm."""
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    last = [record for record in records if "kind" not in record][-1]  # the metrics' records have a kind
    terms = {key.removeprefix("Loss/").rsplit("_q", 1)[0] for key in last if key.startswith("Loss/") and "_q" in key}
    losses = {term: sum(last[f"Loss/{term}_q{q}"] for q in range(4)) / 4 for term in terms}
    return {**losses, "grad_norm": last["Loss/grad_norm"]}


def train(seed: int, fp8: bool, ticks: int) -> tuple[Path, dict[str, float]]:
    """The run directory and last-tick losses of the default run with ``network.fp8=fp8`` (no evaluation during the
    run: :func:`sampled_metrics` evaluates its final checkpoint)."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"fp8-{fp8}-seed{seed}-"))
    cfg = compose_config(
        "tiny",
        [
            f"run_dir={run_dir}",
            f"training.seed={seed}",
            f"training.total_ticks={ticks}",
            f"network.fp8={str(fp8).lower()}",
            "training.do_log_image=false",
            "training.metrics=[]",
        ],
    )
    run(cfg)
    return run_dir, last_tick_losses(run_dir)


def sampled_metrics(run_dir: Path, fp8: bool) -> dict[str, float]:
    """The digits metrics of the run's final checkpoint (its eval EMA), sampled with FP8 GEMMs or without
    (``eval.fp8``; what ``bash eval.sh 1 tiny eval.resume=CHECKPOINT eval.fp8=...`` computes: the network is built
    from the checkpoint as generate.py and eval.py build it), named ``<sampler>_digits_<metric>``."""
    checkpoint = CheckpointManager(run_dir).latest()
    records = evaluate_checkpoints(
        compose_config("tiny", [f"eval.resume={checkpoint}", f"eval.fp8={str(fp8).lower()}"])
    )
    return {
        f"{record['sampler']}_{record['metric']}_{name}": value
        for record in records
        for name, value in record["results"].items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--ticks", type=int, default=10, help="ticks of 100 steps (the default run: 10)")
    args = parser.parse_args()
    rows = []  # (seed, training GEMMs, sampling GEMMs, losses, metrics)
    for seed in (int(s) for s in args.seeds.split(",")):
        for train_fp8 in (False, True):
            run_dir, losses = train(seed, train_fp8, args.ticks)
            for sample_fp8 in (False, True):
                rows.append((seed, train_fp8, sample_fp8, losses, sampled_metrics(run_dir, sample_fp8)))
    loss_names = sorted({key for row in rows for key in row[3]})
    metric_names = sorted({key for row in rows for key in row[4]})
    print("| seed | training GEMMs | sampling GEMMs | " + " | ".join(loss_names + metric_names) + " |")
    print("|---" * (3 + len(loss_names) + len(metric_names)) + "|")
    name = {False: "fp32", True: "FP8"}
    for seed, train_fp8, sample_fp8, losses, metrics in rows:
        values = [losses[k] for k in loss_names] + [metrics[k] for k in metric_names]
        print(f"| {seed} | {name[train_fp8]} | {name[sample_fp8]} | " + " | ".join(f"{v:.4g}" for v in values) + " |")


if __name__ == "__main__":
    main()
