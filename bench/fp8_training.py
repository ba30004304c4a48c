"""Does the tiny DiT train as well with FP8 GEMMs (``network.fp8=true``)? CPU evidence at small scale (Round 17):

    PYTHONPATH=. python bench/fp8_training.py [--seeds 0,1] [--ticks 10]

Runs the embedded default (configs/tiny.yaml: DiT-S/2 layout, hidden 64, 4 blocks, the digits, 1,000 steps of
batch 64, fp32 on the CPU) once as configured and once with the blocks' qkv, proj, fc1 and fc2 as FP8 GEMMs in
forward, tangent and backward (tvm/models/fp8.py; on a CPU ``torch._scaled_mm`` computes the same roundings), per
seed, and prints each run's last-tick losses (from ``stats.jsonl``: each term's mean over the tick, averaged over
its four time bins) and gradient norm, and the digits
metrics of the final EMA at 1, 2 and 4 sampling steps (Fréchet distance to the real digits in a classifier's
feature space, and that classifier's accuracy on class-conditional samples). A few minutes per run on 2 cores.

Small scale only: it says whether the rounding stops a small model from learning, not what it costs DiT-XL/2
on ImageNet (which needs GPU runs and FID).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from tvm.config import compose_config
from tvm.train.loop import run


def last_tick_losses(run_dir: Path) -> dict[str, float]:
    """The run's last tick (``stats.jsonl``'s last training record): each loss term averaged over its four time bins
    (``Loss/<term>_q0`` … ``_q3``), and the gradient norm."""
    records = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    last = [record for record in records if "kind" not in record][-1]  # the metrics' records have a kind
    terms = {key.removeprefix("Loss/").rsplit("_q", 1)[0] for key in last if key.startswith("Loss/") and "_q" in key}
    losses = {term: sum(last[f"Loss/{term}_q{q}"] for q in range(4)) / 4 for term in terms}
    return {**losses, "grad_norm": last["Loss/grad_norm"]}


def train(seed: int, fp8: bool, ticks: int) -> dict:
    run_dir = Path(tempfile.mkdtemp(prefix=f"fp8-{fp8}-seed{seed}-"))
    cfg = compose_config(
        "tiny",
        [
            f"run_dir={run_dir}",
            f"training.seed={seed}",
            f"training.total_ticks={ticks}",
            f"training.eval_ticks={ticks}",
            f"network.fp8={str(fp8).lower()}",
            "training.do_log_image=false",
            "training.no_eval_before_tick=1",
        ],
    )
    result = run(cfg)
    return {"losses": last_tick_losses(run_dir), "metrics": result["metrics"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1", help="comma-separated training seeds")
    parser.add_argument("--ticks", type=int, default=10, help="ticks of 100 steps (the default run: 10)")
    args = parser.parse_args()
    rows = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for fp8 in (False, True):
            rows.append((seed, fp8, train(seed, fp8, args.ticks)))
    losses = sorted({key for *_, r in rows for key in r["losses"]})
    metrics = sorted({key for *_, r in rows for key in r["metrics"]})
    print("| seed | GEMMs | " + " | ".join(losses + metrics) + " |")
    print("|---" * (2 + len(losses) + len(metrics)) + "|")
    for seed, fp8, r in rows:
        values = [r["losses"].get(k, float("nan")) for k in losses]
        values += [r["metrics"].get(k, float("nan")) for k in metrics]
        print(f"| {seed} | {'FP8' if fp8 else 'fp32'} | " + " | ".join(f"{v:.4g}" for v in values) + " |")


if __name__ == "__main__":
    main()
