"""The training loop end to end on the digits (docs/method.md §5; issue: accumulation, resume, DDP, bad input)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from helpers import QUICK_TINY
from tvm.config import compose_config
from tvm.runtime.build import build_network, check_fp8_training_supported, train_in_fp8
from tvm.runtime.checkpoint import CheckpointManager, load_checkpoint
from tvm.train.loop import run
from tvm.train.startup import PHASES, PREFIX, parse_startup_line
from tvm.train.state import Progress, Schedule
from tvm.train.update import NonFiniteCounter, NonFiniteLossError

ROOT = Path(__file__).resolve().parents[2]
QUICK = QUICK_TINY + ["training.ckpt_ticks=1", "training.snapshot_ticks=1000"]


def quick_config(run_dir: Path, *extra: str):
    return compose_config("tiny", QUICK + [f"run_dir={run_dir}", *extra])


def final_checkpoint(run_dir: Path) -> dict:
    path = CheckpointManager(run_dir).latest()
    assert path is not None, f"no checkpoint in {run_dir}"
    return load_checkpoint(path)


def assert_state_dicts_close(a: dict, b: dict, exact: bool = False, rtol: float = 1e-5, atol: float = 1e-6):
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=rtol, atol=atol, msg=key)


def test_run_writes_checkpoints_and_stats(tmp_path):
    result = run(quick_config(tmp_path, "training.total_ticks=2"))
    assert result["progress"]["step"] == 4  # 32 images per tick at batch 16 = 2 steps per tick
    ckpt = final_checkpoint(tmp_path)
    assert ckpt["progress"] == {"step": 4, "nimg": 64, "tick": 2, "skipped": 0, "in_row": 0}
    assert {"net", "ema", "ema_target", "optimizer", "config"} <= ckpt.keys()
    assert (tmp_path / "stats.jsonl").read_text().count("\n") == 2
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "log.txt").is_file()


@pytest.mark.parametrize("split_backward", [True, False])
def test_gradient_accumulation_equals_the_full_batch(tmp_path, split_backward):
    """4 micro-batches equal one batch, with each loss term's backward on its own (the configs' setting)
    in the accumulated run or in the full-batch run (one backward of the sum, as upstream)."""
    run(quick_config(tmp_path / "full", "training.total_ticks=2", f"training.split_backward={not split_backward}"))
    run(
        quick_config(
            tmp_path / "accum",
            "training.total_ticks=2",
            "training.batch_gpu=4",
            f"training.split_backward={split_backward}",
        )
    )
    full, accum = final_checkpoint(tmp_path / "full"), final_checkpoint(tmp_path / "accum")
    # Summing 4 micro-batch gradients rounds differently from one batch; AdamW divides by √v + ε,
    # which magnifies that for parameters whose gradients are near ε (the zero-initialised adaLN
    # layers: 3e-6 to 1.4e-5 on weights of 5e-3 seen on CPUs, depending on how the first block's
    # tokens are laid out). A wrong accumulation (a missing or mis-scaled micro-batch) moves the
    # weights by up to lr = 2e-3 per step, 65x atol.
    assert_state_dicts_close(full["net"], accum["net"], atol=3e-5)
    assert_state_dicts_close(full["ema"], accum["ema"], atol=3e-5)


def test_resume_is_exact_and_skips_the_initialisation(tmp_path, monkeypatch):
    """A run resumed from its run directory or from ``training.resume`` builds its network without the
    initialisation (the checkpoint replaces every weight and the RNG states) and still ends bit for bit
    where the uninterrupted run ends; the start-up line says which way the network was built."""
    import tvm.models.dit as dit

    initialised = []
    initialize = dit.initialize_dit
    monkeypatch.setattr(
        dit, "initialize_dit", lambda *args, **kwargs: initialised.append(1) or initialize(*args, **kwargs)
    )
    run(quick_config(tmp_path / "straight", "training.total_ticks=3"))
    run(quick_config(tmp_path / "resumed", "training.total_ticks=1"))
    assert len(initialised) == 2
    result = run(quick_config(tmp_path / "resumed", "training.total_ticks=3"))  # auto-resumes from the latest
    first = CheckpointManager(tmp_path / "resumed").path_for(2)
    run(quick_config(tmp_path / "explicit", "training.total_ticks=3", f"training.resume={first}"))
    assert len(initialised) == 2, "a resumed run initialised its network"
    assert result["progress"]["step"] == 6
    straight = final_checkpoint(tmp_path / "straight")
    for resumed in (final_checkpoint(tmp_path / "resumed"), final_checkpoint(tmp_path / "explicit")):
        for name in ("net", "ema", "ema_target"):
            assert_state_dicts_close(straight[name], resumed[name], exact=True)
        for key, moments in straight["optimizer"]["state"].items():
            assert_state_dicts_close(moments, resumed["optimizer"]["state"][key], exact=True)
    stats = [(tmp_path / d / "stats.jsonl").read_text().splitlines() for d in ("straight", "resumed")]
    strip = lambda line: {k: v for k, v in __import__("json").loads(line).items() if "Loss" in k}  # noqa: E731
    assert [strip(line) for line in stats[0]] == [strip(line) for line in stats[1]]
    starts = [line for line in (tmp_path / "resumed" / "log.txt").read_text().splitlines() if line.startswith(PREFIX)]
    assert len(starts) == 2
    assert "build" in starts[0] and "(weights initialised)" in starts[0]
    assert "(initialisation skipped: the checkpoint replaces it)" in starts[1]
    phases = parse_startup_line(starts[1])
    assert list(phases) == [*PHASES, "total"]
    assert sum(phases[name] for name in PHASES) == pytest.approx(phases["total"], abs=0.05 * len(PHASES))


def test_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    """Asking a finished run directory for fewer (or as many) steps trains nothing, rewrites nothing
    (config.yaml keeps the finished run's settings) and says why."""
    run(quick_config(tmp_path, "training.total_ticks=2"))
    config, files = (tmp_path / "config.yaml").read_text(), sorted(p.name for p in tmp_path.iterdir())
    capsys.readouterr()
    for ticks in (1, 2):
        result = run(quick_config(tmp_path, f"training.total_ticks={ticks}"))
        assert result["already_finished"] and result["progress"]["step"] == 4 and not result["preempted"]
        assert (
            f"run already finished: {tmp_path / 'checkpoint-00000004.pt'} is at step 4 >= total {2 * ticks}"
            in capsys.readouterr().out
        )
    assert (tmp_path / "config.yaml").read_text() == config
    assert sorted(p.name for p in tmp_path.iterdir()) == files


def test_transfer_loads_weights_only(tmp_path):
    run(quick_config(tmp_path / "src", "training.total_ticks=1"))
    src = final_checkpoint(tmp_path / "src")
    path = CheckpointManager(tmp_path / "src").latest()
    result = run(
        quick_config(tmp_path / "dst", "training.total_ticks=1", f"training.transfer={path}", "optimizer.lr=0")
    )
    assert result["progress"]["step"] == 2  # a fresh run: counters start at 0
    dst = final_checkpoint(tmp_path / "dst")
    for name in ("net", "ema", "ema_target"):  # lr = 0 keeps every copy at the transferred EMA weights
        assert_state_dicts_close(dst[name], src["ema"], exact=True)


def test_fp8_training_runs_its_gemms_in_fp8_and_saves_a_plain_checkpoint(tmp_path, monkeypatch):
    """``network.fp8=true``: every step runs the blocks' GEMMs through the FP8 path (forward and backward, the
    EMAs' calls too), and the checkpoint is the plain network's (it loads strictly into a network built without
    FP8, as generate.py and eval.py build it)."""
    import tvm.models.fp8 as fp8

    calls = []
    real = fp8.fp8_matmul
    monkeypatch.setattr(fp8, "fp8_matmul", lambda a, b: calls.append(a.shape) or real(a, b))
    result = run(quick_config(tmp_path, "training.total_ticks=1", "network.fp8=true"))
    assert result["progress"]["step"] == 2
    assert "the blocks' linear layers train as FP8 GEMMs (network.fp8)" in (tmp_path / "log.txt").read_text()
    # 2 steps × 2 blocks × 4 layers (qkv, proj, fc1, fc2) × (3 forward GEMMs: the JVP pass's value and tangent
    # as one, the teacher's, the flow-matching pass's; + 2 gradient GEMMs each for the two passes that train)
    assert len(calls) == 2 * 2 * 4 * (3 + 2 * 2)
    ckpt = final_checkpoint(tmp_path)
    cfg = quick_config(tmp_path, "network.fp8=false")
    plain = build_network(cfg.network, 8, 1, 10, init=False)
    plain.load_state_dict(ckpt["ema"])
    assert not plain.model.fp8 and all(torch.isfinite(v).all() for v in ckpt["net"].values())


def test_fp8_training_refuses_what_it_cannot_run_with():
    cfg = quick_config(Path("unused"), "network.fp8=true", "network.sharding=fsdp2")
    with pytest.raises(ValueError, match="network.fp8=true runs with network.sharding=ddp only"):
        train_in_fp8(build_network(cfg.network, 8, 1, 10), cfg.network)
    compiled = quick_config(Path("unused"), "network.fp8=true", "network.compile=true").network
    with pytest.raises(ValueError, match="network.fp8=true with network.compile=true gave wrong gradients on the GPU"):
        check_fp8_training_supported(compiled, torch.device("cuda"))
    check_fp8_training_supported(compiled, torch.device("cpu"))  # the CPU's compiled gradients are right (tests)
    check_fp8_training_supported(quick_config(Path("unused"), "network.fp8=true").network, torch.device("cuda"))


def test_nonfinite_steps_are_skipped_counted_and_stop_the_run(tmp_path, monkeypatch):
    import tvm.train.loop as loop

    real = loop.TVMWrapper.forward

    def poisoned(self, *inputs, phase="loss"):
        if phase == "fm":  # the split backward's second phase: poisoned through its target already
            return real(self, *inputs, phase=phase)
        x, labels, draws, teacher = inputs
        return real(self, x * float("nan"), labels, draws, teacher, phase=phase)

    monkeypatch.setattr(loop.TVMWrapper, "forward", poisoned)
    with pytest.raises(NonFiniteLossError, match="consecutive steps had non-finite"):
        run(quick_config(tmp_path, "training.total_ticks=3", "training.max_nonfinite_in_row=3"))
    ckpt = final_checkpoint(tmp_path)  # written at tick 1, before the policy stopped the run
    assert ckpt["progress"]["skipped"] == 2
    for name in ("net", "ema", "ema_target"):
        assert all(torch.isfinite(v).all() for v in ckpt[name].values())
    fresh = run(quick_config(tmp_path / "fresh", "training.total_ticks=0"))
    assert fresh["progress"]["step"] == 0


@pytest.mark.parametrize(
    "overrides, match",
    [
        (
            ["dataset.class_name=tvm.data.datasets.ImageFolderDataset", "dataset.path=/nonexistent/data.zip"],
            "/nonexistent/data.zip",
        ),
        (["dataset.class_name=tvm.data.datasets.ImageFolderDataset"], "dataset.path is not set"),
        (["training.batch_size=10", "training.batch_gpu=4"], "not divisible by world size × batch_gpu"),
        (["dataset.resolution=16"], "dataset resolution 8 does not match dataset.resolution=16"),
        (["loss.cfg=0.5"], "cfg = 0.5 is not allowed"),
        (["network.model_type=DiT-Q/2"], "unknown model variant 'DiT-Q/2'"),
        (
            ["dataset.path=data/imagenet.zip"],
            "dataset.path=data/imagenet.zip is set but "
            "dataset.class_name=tvm.data.digits.DigitsDataset reads no files",
        ),
        (["+training.totl_ticks=3"], r"unknown config key training.totl_ticks \(did you mean training.total_ticks\?\)"),
        (["training.total_ticks=-3"], "training.total_ticks=-3 is not allowed: it must be >= 0"),
        (["network.data_type=fp16"], "network.data_type=fp16 is not supported for training"),
        (["network.fp8=true", "network.jvp_mode=autograd"], "network.fp8=true needs network.jvp_mode=explicit"),
        (["training.resume=a.pt", "training.transfer=b.pt"], "training.resume and training.transfer are mutually"),
        (["training.metrics=[fid10k]"], "unknown metric 'fid10k' in training.metrics; allowed: digits, fid50k_full"),
        (["training.metrics=[fid50k_full]"], "training.metrics has fid50k_full but eval.ref_stats is not set"),
    ],
)
def test_bad_input_fails_clearly_without_a_checkpoint(tmp_path, overrides, match):
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        run(quick_config(tmp_path, "training.total_ticks=1", *overrides))
    assert not list(tmp_path.glob("checkpoint-*"))


def test_unknown_config_key_is_named(tmp_path):
    proc = subprocess.run(
        [sys.executable, "train.py", "--config-name=tiny", "training.bogus_key=1", f"run_dir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "training.bogus_key" in proc.stderr
    assert not list(tmp_path.glob("checkpoint-*"))


def torchrun(nproc: int, run_dir: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "train.py",
        "--config-name=tiny",
        *QUICK,
        f"run_dir={run_dir}",
        *extra,
    ]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_process_ddp_equals_one_process(tmp_path):
    for n in (1, 2):  # one backward of the sum on one process; each term's own (the default) on two
        split = f"training.split_backward={n == 2}"
        proc = torchrun(n, tmp_path / f"w{n}", "training.total_ticks=2", "optimizer.lr=1e-4", split)
        assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = final_checkpoint(tmp_path / "w1"), final_checkpoint(tmp_path / "w2")
    # Sums in another order differ by fp32 rounding, which Adam's normalisation amplifies for
    # elements with near-zero gradients (up to a fraction of lr): hence the small learning rate.
    assert_state_dicts_close(one["net"], two["net"])
    assert_state_dicts_close(one["ema_target"], two["ema_target"])


@pytest.mark.parametrize("compile_cache", [True, False])
def test_kernel_cache_is_the_run_directory_with_the_compile_cache(tmp_path, monkeypatch, compile_cache):
    """With ``network.compile_cache`` our Triton kernels compile and tune into ``<run dir>/triton-cache``
    from before the first compilation to the end of the run; without it, and after the run, Triton's own
    directory is used. (Compilation itself is replaced by a recorder: the setting is what is tested.)"""
    import tvm.train.loop as loop
    from kernels import launch_plans

    seen = []

    def record_compile(ddp, *args, **kwargs):
        seen.append(launch_plans.cache_dir())
        return ddp

    monkeypatch.setattr(loop, "compile_training", record_compile)
    run(
        quick_config(
            tmp_path, "training.total_ticks=1", "network.compile=true", f"network.compile_cache={compile_cache}"
        )
    )
    assert seen == [tmp_path / "triton-cache" if compile_cache else None]
    assert launch_plans.cache_dir() is None


def test_compiled_training_sets_the_memory_budget_and_static_shapes():
    import torch._functorch.config as functorch_config

    from tvm.compiling import compile_training

    # torch's config modules are restored with their own patch() (monkeypatch's undo deletes the
    # attribute of a config module, which breaks later compilations in the same process).
    with (
        functorch_config.patch(activation_memory_budget=1.0),
        torch._dynamo.config.patch(automatic_dynamic_shapes=True),
    ):
        network = OmegaConf.create({"compile_scope": "full", "compile_memory_budget": 0.7})
        compile_training(torch.nn.Linear(1, 1), None, None, None, network)
        assert functorch_config.activation_memory_budget == 0.7
        assert not torch._dynamo.config.automatic_dynamic_shapes
        with pytest.raises(ValueError, match="compile_memory_budget must be in"):
            compile_training(
                torch.nn.Linear(1, 1),
                None,
                None,
                None,
                OmegaConf.create({"compile_scope": "full", "compile_memory_budget": 7}),
            )


def test_imagenet_configs_compile_and_the_cpu_default_does_not():
    assert compose_config("im256_w2").network.compile and compose_config("im512_w2p5").network.compile
    assert not compose_config("tiny").network.compile
    assert compose_config("im256_w2").network.compile_memory_budget == 0.7  # 31 GiB at b32 (docs/benchmarks.md)


def test_schedule_counts_whole_ticks_and_caps_at_max_steps():
    tcfg = OmegaConf.create({"kimg_per_tick": 0.1, "batch_size": 32, "total_ticks": 5, "max_steps": None})
    assert Schedule.from_config(tcfg) == Schedule(steps_per_tick=3, total_steps=15)  # round(100 / 32) = 3
    tcfg.max_steps = 7
    assert Schedule.from_config(tcfg) == Schedule(steps_per_tick=3, total_steps=7)
    tcfg.kimg_per_tick = 0.001  # fewer images than one batch: one step per tick
    assert Schedule.from_config(tcfg).steps_per_tick == 1


def test_nonfinite_counter_finds_the_longest_run_of_skips_between_syncs():
    progress = Progress(step=10, skipped=4, in_row=2)  # two skipped steps in a row at the last sync
    counter = NonFiniteCounter(progress, torch.device("cpu"))
    for skip in (1, 1, 0, 1, 1, 1, 0):
        counter.record(torch.tensor(bool(skip)))
    assert counter.sync(progress) == 4  # the 2 before the sync + 2, longer than the later 3
    assert (progress.skipped, progress.in_row) == (4 + 5, 0)
    for skip in (1, 1):
        counter.record(torch.tensor(bool(skip)))
    assert counter.sync(progress) == 2  # the window restarted at the sync
    assert (progress.skipped, progress.in_row) == (11, 2)
