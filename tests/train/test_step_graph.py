"""The whole training step as one CUDA graph (tvm/train/step_graph.py, ``training.cuda_graph``): the
settings it refuses (on any machine) and, on a GPU, a captured run equal bit for bit to the eager run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.method.times import StepDraws
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint
from tvm.train.loop import run
from tvm.train.step_graph import StaticInputs, StepGraph, capturable, check_cuda_graph_supported

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")


@pytest.mark.parametrize(
    ("device", "distributed", "sharding", "compile", "mode", "match"),
    [
        (torch.device("cpu"), False, "ddp", False, "default", "needs a CUDA device"),
        (CUDA, True, "ddp", True, "default", "one process"),
        (CUDA, False, "fsdp2", True, "default", "one process"),
        (CUDA, False, "ddp", True, "reduce-overhead", "compile_mode=reduce-overhead"),
        (CUDA, False, "ddp", True, "max-autotune", "compile_mode=max-autotune"),
    ],
)
def test_unsupported_settings_are_refused_by_name(device, distributed, sharding, compile, mode, match):
    with pytest.raises(ValueError, match=match):
        check_cuda_graph_supported(device, distributed, sharding, compile, mode)


def test_supported_settings_pass():
    check_cuda_graph_supported(CUDA, False, "ddp", True, "default")
    check_cuda_graph_supported(CUDA, False, "ddp", True, "max-autotune-no-cudagraphs")
    check_cuda_graph_supported(CUDA, False, "ddp", False, "reduce-overhead")  # the mode is moot uncompiled


def test_a_cpu_run_with_cuda_graph_fails_before_training(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the run would train on the GPU")
    cfg = compose_config("tiny", QUICK_TINY + [f"run_dir={tmp_path}", "training.cuda_graph=true"])
    with pytest.raises(ValueError, match="training.cuda_graph=true needs a CUDA device; this run trains on cpu"):
        run(cfg)
    assert CheckpointManager(tmp_path).latest() is None


def test_capturable_marks_the_groups_only_inside():
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))]
    opt = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:], "capturable": True}])
    with capturable([opt]):
        assert [g["capturable"] for g in opt.param_groups] == [True, True]
    assert [g["capturable"] for g in opt.param_groups] == [False, True]
    with pytest.raises(KeyError), capturable([opt]):
        raise KeyError("the flags are restored on errors too")
    assert [g["capturable"] for g in opt.param_groups] == [False, True]


def test_at_least_one_eager_step():
    with pytest.raises(ValueError, match="at least one eager warm-up step"):
        StepGraph(lambda inputs: {}, warmup=0)


def step_parts(seed: int, n: int = 4, labels: bool = True) -> list[tuple]:
    """Inputs shaped like the loop's: per micro-batch ``(x, labels or None, StepDraws)``."""
    gen = torch.Generator().manual_seed(seed)
    draws = StepDraws(
        *(torch.rand(n, 1, 1, 1, generator=gen) for _ in range(4)),
        torch.randn(n, 2, 8, 8, generator=gen),
        torch.rand(n, generator=gen) < 0.5,
    )
    return [(torch.randn(n, 2, 8, 8, generator=gen), torch.eye(10)[:n] if labels else None, draws)] * 2


def test_static_inputs_take_each_calls_values_into_the_same_buffers():
    """The buffers the graph reads (dataclass fields included) get every new call's values in place."""
    first, second = step_parts(0), step_parts(1)
    static = StaticInputs(first)
    buffers = [leaf.data_ptr() for leaf in static.leaves if isinstance(leaf, torch.Tensor)]
    assert len(buffers) == 2 * (2 + 6)  # 2 micro-batches × (x, labels, 6 draws)
    assert static.tree[0][2].noise is not first[0][2].noise  # a copy, not the caller's tensors
    static.load(second)
    assert [leaf.data_ptr() for leaf in static.leaves if isinstance(leaf, torch.Tensor)] == buffers
    for mine, new in zip(
        static.leaves, [leaf for part in second for leaf in (part[0], part[1], *vars(part[2]).values())]
    ):
        assert torch.equal(mine, new)
    assert torch.equal(static.tree[1][2].t, second[1][2].t)


def test_static_inputs_refuse_new_shapes_dtypes_and_structure():
    static = StaticInputs(step_parts(0))
    for bad, match in (
        (step_parts(1, n=3), "static shapes"),
        ([(x.double(), y, d) for x, y, d in step_parts(1)], "static shapes"),
        (step_parts(1, labels=False), "changed structure"),
        (step_parts(1)[:1], "changed structure"),
    ):
        with pytest.raises(ValueError, match=match):
            static.load(bad)


@needs_cuda
def test_replays_follow_new_inputs():
    """A captured ``y = 2x + w; w += 1`` replays on each call's own inputs and its state carries over."""
    w = torch.zeros(3, device="cuda")

    def step(inputs):
        x, (scale,) = inputs
        y = scale * x + w
        w.add_(1)
        return {"y": y}

    graph = StepGraph(step, warmup=2)
    for i in range(6):
        x = torch.full((3,), float(i), device="cuda")
        out = graph((x, (torch.tensor(2.0, device="cuda"),)))
        torch.testing.assert_close(out["y"], 2 * x + i, rtol=0, atol=0)
        assert graph.captured == (i >= 2)
    assert torch.equal(w, torch.full((3,), 6.0, device="cuda"))


def final_state(run_dir: Path) -> dict:
    path = CheckpointManager(run_dir).latest()
    assert path is not None
    return load_checkpoint(path)


def assert_equal_trees(a, b, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_equal_trees(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_equal_trees(x, y, f"{where}/{i}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    else:
        assert a == b, where


@needs_cuda
@pytest.mark.parametrize("compile", [False, True])
def test_a_captured_run_equals_the_eager_run_bit_for_bit(tmp_path, compile):
    """8 steps of the tiny run on the GPU (3 eager, the capture, 4 replays), uncompiled and with the
    blocks compiled: weights, EMAs, AdamW state, progress and logged losses equal the eager run's."""
    runs = {}
    for graph in (False, True):
        overrides = QUICK_TINY + [
            f"run_dir={tmp_path / str(graph)}",
            "training.total_ticks=4",
            f"training.cuda_graph={graph}",
            f"network.compile={compile}",
        ]
        run(compose_config("tiny", overrides))
        runs[graph] = final_state(tmp_path / str(graph))
    assert runs[True]["progress"]["step"] == 8
    for key in ("net", "ema", "ema_target", "optimizer", "progress"):
        assert_equal_trees(runs[False][key], runs[True][key], key)
    logged = []
    for graph in (False, True):
        records = [json.loads(line) for line in (tmp_path / str(graph) / "stats.jsonl").read_text().splitlines()]
        logged.append([{k: v for k, v in r.items() if k.startswith("Loss/") or k == "skipped_steps"} for r in records])
    assert len(logged[0]) == 4 and "Loss/grad_norm" in logged[0][-1]
    assert logged[0] == logged[1]
