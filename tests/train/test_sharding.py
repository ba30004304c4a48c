"""FSDP2 (``network.sharding=fsdp2``, tvm/train/sharding.py) against DDP on 2 CPU processes (gloo).

* losses, weights, both EMAs and AdamW's moments of a sharded run equal DDP's to fp32 tolerance
  after several steps (with 2 accumulation rounds per rank and each loss term's own backward, so that
  DDP's gradient-sync switch is used and FSDP2 reduce-scatters four times a step);
* gradients stay sharded between a step's backward passes;
* a sharded run's checkpoint is the DDP format: full tensors, loadable by the single-process
  tools, resumable by a sharded run (exactly as an uninterrupted one) and by a DDP run;
* unsupported combinations fail with an error naming the setting; the per-rank memory estimate.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch

from helpers import QUICK_TINY, fork_ranks
from tvm.config import compose_config
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint
from tvm.train.sharding import check_sharding_supported, state_memory_per_rank

# 4 ticks of 2 steps, batch 16 = 2 ranks × 4 per micro-batch × 2 rounds; lr 1e-4 (see test_multinode.py:
# Adam magnifies fp32 reduction-order noise in near-zero gradients at larger rates).
RUN = QUICK_TINY + [
    "training.ckpt_ticks=1",
    "training.snapshot_ticks=1000",
    "training.batch_gpu=4",
    "optimizer.lr=1e-4",
    "training.seed=3",
]


def train_on_two_ranks(run_dir: Path, *overrides: str) -> None:
    from tvm.train.loop import run

    cfg = compose_config("tiny", RUN + [f"run_dir={run_dir}", *overrides])

    def worker(rank: int) -> None:
        torch.set_num_threads(1)
        run(cfg)

    fork_ranks(worker, 2, timeout=240)


def latest(run_dir: Path) -> dict:
    return load_checkpoint(CheckpointManager(run_dir).latest())


def tick_losses(run_dir: Path) -> list[dict[str, float]]:
    """Each tick's ``Loss/*`` statistics (binned loss terms, gradient norm) from stats.jsonl."""
    lines = [json.loads(line) for line in (run_dir / "stats.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key.startswith("Loss/")} for line in lines if "tick" in line]


def assert_tensors_close(a, b, where: str, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_tensors_close(a[key], b[key], f"{where}.{key}", rtol, atol)
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=where)
    else:
        assert a == b, where


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sharding")
    train_on_two_ranks(root / "ddp", "training.total_ticks=4")
    train_on_two_ranks(root / "fsdp2", "training.total_ticks=4", "network.sharding=fsdp2")
    return root


@pytest.mark.slow
def test_fsdp2_training_equals_ddp(runs):
    ddp, fsdp = latest(runs / "ddp"), latest(runs / "fsdp2")
    assert ddp["progress"] == fsdp["progress"] and fsdp["progress"]["step"] == 8
    losses_ddp, losses_fsdp = tick_losses(runs / "ddp"), tick_losses(runs / "fsdp2")
    assert len(losses_fsdp) == 4 and all("Loss/grad_norm" in row for row in losses_fsdp)
    for tick, (row_fsdp, row_ddp) in enumerate(zip(losses_fsdp, losses_ddp), 1):
        assert row_fsdp.keys() == row_ddp.keys(), tick
        torch.testing.assert_close(
            torch.tensor(list(row_fsdp.values()), dtype=torch.float64),
            torch.tensor(list(row_ddp.values()), dtype=torch.float64),
            rtol=1e-5,
            atol=1e-8,
            msg=f"tick {tick}",
        )
    earlier = latest_initial(runs)
    for name in ("net", "ema", "ema_target"):
        assert_tensors_close(fsdp[name], ddp[name], name)
        moved = max((fsdp[name][k] - earlier[name][k]).abs().max().item() for k in fsdp[name])
        assert moved > 1e-6, f"{name} did not change between steps 4 and 8"
    assert_tensors_close(fsdp["optimizer"]["state"], ddp["optimizer"]["state"], "optimizer", atol=1e-8)
    assert fsdp["optimizer"]["param_groups"] == ddp["optimizer"]["param_groups"]


def latest_initial(runs: Path) -> dict:
    """The oldest checkpoint kept of the sharded run (step 4), to check that training moved the weights."""
    return load_checkpoint(CheckpointManager(runs / "fsdp2").all()[-1])


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_exactly_and_loads_anywhere(runs, tmp_path):
    from tvm.eval.checkpoints import load_network_for_eval
    from tvm.eval.generate import generate_images
    from tvm.runtime.build import encoder_from_config

    # A sharded run stopped after 2 ticks and continued to 4 equals the uninterrupted sharded run.
    train_on_two_ranks(tmp_path / "resumed", "training.total_ticks=2", "network.sharding=fsdp2")
    train_on_two_ranks(tmp_path / "resumed", "training.total_ticks=4", "network.sharding=fsdp2")
    straight, resumed = latest(runs / "fsdp2"), latest(tmp_path / "resumed")
    for name in ("net", "ema", "ema_target"):
        assert_tensors_close(resumed[name], straight[name], name, rtol=0, atol=0)
    assert_tensors_close(resumed["optimizer"]["state"], straight["optimizer"]["state"], "optimizer", rtol=0, atol=0)

    # A DDP run continues the sharded checkpoint (same format) like the sharded run does.
    ckpt_2 = CheckpointManager(tmp_path / "resumed").path_for(4)
    train_on_two_ranks(tmp_path / "to-ddp", "training.total_ticks=4", f"training.resume={ckpt_2}")
    assert_tensors_close(latest(tmp_path / "to-ddp")["net"], straight["net"], "net (DDP continuing FSDP2)")

    # The single-process tools load it: full tensors, no DTensor, and it samples.
    path = CheckpointManager(runs / "fsdp2").latest()
    assert all(type(v) is torch.Tensor for v in load_checkpoint(path)["ema"].values())
    net, cfg, step = load_network_for_eval(path)
    assert step == 8
    encoder = encoder_from_config(cfg.encoder)
    images = generate_images(net, encoder, [0, 1, 2], steps=1, guidance=1.0, seed=0, device="cpu")
    assert images.shape[0] == 3 and torch.isfinite(images.float()).all()


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"distributed": False}, "needs a process group"),
        ({"jvp_mode": "autograd"}, "network.jvp_mode=explicit"),
        ({"compile": True, "compile_scope": "full"}, "network.compile_scope=blocks"),
        ({"recompute": "fm"}, "network.recompute"),
        (
            {"compile": True, "compile_mode": "reduce-overhead"},
            "compile_mode=reduce-overhead.*use compile_mode=default",
        ),
        (
            {"compile": True, "compile_mode": "max-autotune"},
            "max-autotune .*use compile_mode=max-autotune-no-cudagraphs",
        ),
    ],
)
def test_unsupported_combinations_are_named(settings, match):
    args = (
        dict(
            sharding="fsdp2",
            jvp_mode="explicit",
            compile_scope="blocks",
            compile=False,
            recompute="none",
            distributed=True,
            compile_mode="default",
        )
        | settings
    )
    with pytest.raises(ValueError, match=match):
        check_sharding_supported(**args)
    if "sharding" not in settings:
        check_sharding_supported(**(args | {"sharding": "ddp"}))  # DDP accepts each of these


def test_fsdp2_in_one_process_without_a_group_is_refused(tmp_path):
    from tvm.train.loop import run

    with pytest.raises(ValueError, match="needs a process group"):
        run(compose_config("tiny", RUN + [f"run_dir={tmp_path}", "network.sharding=fsdp2"]))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_state_memory_per_rank_is_six_fp32_copies_split_over_the_ranks():
    params = 678_363_408  # DiT-XL/2-18h at 256 px (trainable and frozen)
    ddp = state_memory_per_rank(params, 8, "ddp")
    assert ddp == 6 * 4 * params  # 16.3 GB on every rank whatever the count
    assert state_memory_per_rank(params, 2, "fsdp2") == ddp / 2
    assert state_memory_per_rank(params, 8, "fsdp2") == pytest.approx(2.035e9, rel=1e-3)


@pytest.mark.parametrize("split", [True, False])
def test_fsdp2_gradients_stay_sharded_between_backward_passes(tmp_path, split):
    """Every backward reduce-scatters (FSDP2's default; the loop never switches it off): after a step's
    first micro-batch, whose backward (one, or one per loss term) is not the step's last, every gradient
    is already this rank's slice of the averaged gradient (``.grad`` set and sharded; accumulating
    without sync would leave it unset and hold an unsharded copy), and the step's gradient equals the
    average over the ranks of the plain network's, as DDP's."""
    import copy

    from helpers import one_hot, tiny_wrapper
    from tvm.method.times import Guidance, TimeSampling, draw_step
    from tvm.runtime import distributed
    from tvm.train.sharding import is_sharded, local, shard_like, shard_network
    from tvm.train.update import gradient_sync, loss_and_backward, take

    def worker(rank: int) -> None:
        torch.set_num_threads(1)
        distributed.init_distributed(device="cpu")
        net = tiny_wrapper(dtype=torch.float32)  # seeded: the same weights on both ranks
        plain, teacher = copy.deepcopy(net), copy.deepcopy(net).eval().requires_grad_(False)
        shard_network(net)
        gen = torch.Generator().manual_seed(rank)  # each rank its own 4 images, as 2 micro-batches of 2
        x, labels = torch.randn(4, 2, 8, 8, generator=gen), one_hot([0, 1, 2, 3]).float()
        draws = draw_step(gen, 4, (2, 8, 8), TimeSampling(), Guidance(cfg=2.0), "cpu")
        scale = 2 / 8  # world / global batch, as the loop
        sharded_after_first = []
        for round_, rows in enumerate((torch.arange(0, 2), torch.arange(2, 4))):
            part = (x[rows], labels[rows], take(draws, rows))
            last_round = round_ == 1
            loss_and_backward(
                net, teacher, *part, scale, lambda last: gradient_sync(net, True, True, last_round and last), split
            )
            if round_ == 0:
                sharded_after_first = [is_sharded(p.grad) for p in net.parameters() if p.requires_grad]
            loss_and_backward(plain, teacher, *part, scale, lambda last: contextlib.nullcontext(), split)
        errors = []
        for (name, p), q in zip(net.named_parameters(), plain.parameters()):
            if not q.requires_grad:  # the fixed positional embedding
                continue
            full = q.grad.clone()
            torch.distributed.all_reduce(full)
            expected = local(shard_like(full / 2, p))
            errors.append([name, float((local(p.grad) - expected).abs().max() / full.abs().max().clamp_min(1e-12))])
        (tmp_path / f"rank{rank}.json").write_text(json.dumps({"sharded": sharded_after_first, "errors": errors}))
        distributed.cleanup()

    fork_ranks(worker, 2, timeout=120)
    for rank in range(2):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["sharded"] and all(result["sharded"]), rank
        worst = max(result["errors"], key=lambda e: e[1])
        assert worst[1] < 1e-5, (rank, worst)
