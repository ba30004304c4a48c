"""A shortened embedded default run: real digits, the real config, metrics at the start and the end."""

from __future__ import annotations

import json

import pytest

from tvm.config import compose_config
from tvm.train.loop import run


@pytest.mark.slow
def test_shortened_tiny_run_learns_digits(tmp_path):
    cfg = compose_config(
        "tiny",
        [
            f"run_dir={tmp_path}",
            "training.total_ticks=3",
            "training.eval_ticks=3",
            "training.sample_ticks=3",
            "eval.num_images=500",
        ],
    )
    result = run(cfg)
    assert result["progress"]["step"] == 300
    lines = [json.loads(line) for line in (tmp_path / "stats.jsonl").read_text().splitlines()]
    metrics = [line for line in lines if line.get("kind") == "metrics"]
    start, end = metrics[0], metrics[-1]
    assert start["1_step_digits_frechet"] > 5  # an untrained network outputs its input noise
    assert end["1_step_digits_frechet"] < start["1_step_digits_frechet"] / 3
    for steps in (1, 2, 4):
        assert (tmp_path / "samples" / f"{steps}_step-tick000003.png").is_file()
    assert list(tmp_path.glob("checkpoint-*.pt"))
