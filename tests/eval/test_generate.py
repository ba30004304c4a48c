"""Generation from checkpoints: loading, index sharding, scripts/generate.py (docs/method.md §4, §11 item 12)."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import QUICK_TINY, fork_ranks
from tvm.config import compose_config
from tvm.data.encoders import PixelEncoder
from tvm.eval import generate as gen
from tvm.eval.checkpoints import data_facts, load_network_for_eval
from tvm.runtime import distributed
from tvm.runtime.checkpoint import CheckpointError, find_checkpoints, load_checkpoint
from tvm.train.loop import run

ROOT = Path(__file__).resolve().parents[2]
QUICK = QUICK_TINY + ["training.total_ticks=1"]


def tiny_checkpoint(run_dir: Path, *extra: str) -> Path:
    """One tick (2 steps) of the tiny digits run; returns its checkpoint."""
    run(compose_config("tiny", QUICK + [f"run_dir={run_dir}", *extra]))
    return find_checkpoints(run_dir)[0]


@pytest.fixture(scope="module")
def cond_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("cond"))


@pytest.fixture(scope="module")
def uncond_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("uncond"), "dataset.use_labels=false")


def _script():
    spec = importlib.util.spec_from_file_location("generate_script", ROOT / "scripts" / "generate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _read_pngs(folder: Path, indices) -> np.ndarray:
    return np.stack([np.asarray(Image.open(folder / f"{i:06d}.png")) for i in indices])


# ------------------------------------------------------------------------------ parsing


def test_index_ranges_and_classes() -> None:
    assert gen.parse_index_ranges("0-3,10,20-21") == [0, 1, 2, 3, 10, 20, 21]
    assert gen.parse_index_ranges("7") == [7]
    for bad in ("5-2", "a-b", "1,,2", "0-3,2"):
        with pytest.raises(ValueError):
            gen.parse_index_ranges(bad)
    assert gen.parse_classes("1,2,9", 10) == [1, 2, 9]
    with pytest.raises(ValueError, match="outside"):
        gen.parse_classes("10", 10)
    with pytest.raises(ValueError, match="unconditional"):
        gen.parse_classes("1", 0)
    sampling = {"1_step": {"num_steps": 1, "cfg_scale": 2.0}, "4_step": {"num_steps": 4, "cfg_scale": 2.5}}
    assert gen.default_cfg_scale(sampling, 4) == 2.5
    assert gen.default_cfg_scale(sampling, 3) == 2.0
    assert gen.default_cfg_scale({}, 1) == 1.0


# ------------------------------------------------------------------------------ checkpoint loading


def test_load_network_for_eval_uses_ema_and_infers_data_facts(cond_ckpt: Path, tmp_path: Path) -> None:
    net, cfg, step = load_network_for_eval(cond_ckpt, ["network.attn_backend=math"])
    ckpt = load_checkpoint(cond_ckpt)
    assert step == ckpt["progress"]["step"] == 2
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    assert net.attn_backend == "math" and cfg.network.attn_backend == "math"
    for key, value in net.state_dict().items():
        assert torch.equal(value, ckpt["ema"][key]), key
    assert ckpt["data"] == {"resolution": 8, "channels": 1, "label_dim": 10}
    facts = data_facts({k: v for k, v in ckpt.items() if k != "data"})  # inferred from the weights' shapes
    assert (facts.resolution, facts.channels, facts.label_dim) == (8, 1, 10)
    assert data_facts({**ckpt, "data": {"resolution": 4, "channels": 3, "label_dim": 0}}).resolution == 4
    with pytest.raises(ValueError, match="override"):
        load_network_for_eval(cond_ckpt, ["network.no_such_key=1"])


def test_unreadable_checkpoint_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "checkpoint-00000001.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match=str(bad)):
        load_network_for_eval(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_network_for_eval(tmp_path / "missing.pt")


def test_upstream_pickle_goes_to_the_compat_loader(cond_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    pkl = tmp_path / "network-snapshot-000100.pkl"
    pkl.write_bytes(b"")
    cfg = compose_config("tiny")
    monkeypatch.setitem(sys.modules, "tvm.compat.upstream", None)
    with pytest.raises(CheckpointError, match="tvm.compat.upstream"):
        load_network_for_eval(pkl, config=cfg)
    seen = {}
    ours, _, _ = load_network_for_eval(cond_ckpt)

    def load_upstream_network(path, config, device):
        seen.update(path=path, config=config, device=device)
        return ours

    monkeypatch.setitem(
        sys.modules, "tvm.compat.upstream", types.SimpleNamespace(load_upstream_network=load_upstream_network)
    )
    with pytest.raises(ValueError, match="name the experiment config"):
        load_network_for_eval(pkl)
    net, got_cfg, step = load_network_for_eval(pkl, ["loss.cfg=2.0"], config=cfg)
    assert net is ours and step is None and seen["path"] == pkl and seen["device"] == torch.device("cpu")
    assert seen["config"].loss.cfg == got_cfg.loss.cfg == 2.0


# ------------------------------------------------------------------------------ sharding


def test_sharded_generation_equals_one_rank(cond_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """Two simulated ranks writing a PNG folder give the images of one rank (any batch size)."""
    net, _, _ = load_network_for_eval(cond_ckpt)
    encoder, indices = PixelEncoder(), [3, 4, 5, 6, 7, 10, 11]
    reference = gen.generate_images(net, encoder, indices, steps=2, guidance=1.5, seed=5)
    gen.generate_to(
        net, encoder, indices, tmp_path / "one", steps=2, guidance=1.5, seed=5, batch_size=64, progress=False
    )
    monkeypatch.setattr(distributed, "get_world_size", lambda: 2)
    for rank in (0, 1):
        monkeypatch.setattr(distributed, "get_rank", lambda rank=rank: rank)
        gen.generate_to(
            net, encoder, indices, tmp_path / "two", steps=2, guidance=1.5, seed=5, batch_size=2, progress=False
        )
    one, two = _read_pngs(tmp_path / "one", indices), _read_pngs(tmp_path / "two", indices)
    np.testing.assert_array_equal(one, reference[:, 0].numpy())
    np.testing.assert_array_equal(one, two)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [f"{i:06d}.png" for i in indices]


# ------------------------------------------------------------------------------ the script


def test_generate_cli_png_and_npz_two_processes(cond_ckpt: Path, tmp_path: Path) -> None:
    """Two CPU processes (gloo) write the .npz whose images one process writes as PNGs."""
    args = ["--ckpt", str(cond_ckpt.parent), "--steps", "2", "--seeds", "0-4,9", "--classes", "1,7"]
    assert _script().main([*args, "--batch", "4", "--out", str(tmp_path / "png")]) == 0
    argv = [*args, "--batch", "2", "--device", "cpu", "--out", str(tmp_path / "two.npz")]
    fork_ranks(lambda rank: sys.exit(_script().main(argv)))  # a rank's exit code = the script's return
    with np.load(tmp_path / "two.npz") as data:
        assert sorted(data.files) == ["images", "labels", "seeds"]
        assert data["images"].shape == (6, 8, 8, 1) and data["images"].dtype == np.uint8
        np.testing.assert_array_equal(data["seeds"], [0, 1, 2, 3, 4, 9])
        np.testing.assert_array_equal(data["labels"], [1, 7, 1, 7, 1, 7])
        np.testing.assert_array_equal(data["images"][..., 0], _read_pngs(tmp_path / "png", [0, 1, 2, 3, 4, 9]))
    assert not list(tmp_path.glob(".*.tmp"))


def test_generate_cli_unconditional_unguided(uncond_ckpt: Path, tmp_path: Path, capsys) -> None:
    script = _script()
    out = tmp_path / "u.npz"
    assert (
        script.main(["--ckpt", str(uncond_ckpt), "--steps", "1", "--cfg", "1", "--seeds", "0-5", "--out", str(out)])
        == 0
    )
    net, _, _ = load_network_for_eval(uncond_ckpt)
    assert net.model.num_classes == 0
    with np.load(out) as data:
        assert sorted(data.files) == ["images", "seeds"]
        expected = gen.generate_images(net, PixelEncoder(), range(6), steps=1, guidance=1.0, seed=0)
        np.testing.assert_array_equal(data["images"], expected.permute(0, 2, 3, 1).numpy())
    assert script.main(["--ckpt", str(uncond_ckpt), "--classes", "1", "--out", str(tmp_path / "x")]) == 1
    assert "unconditional" in capsys.readouterr().err
    assert script.main(["--ckpt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")]) == 1
    assert "nowhere" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag, options",
    [
        ([], None),
        (["--compile"], {}),
        (["--compile", "max-autotune-no-cudagraphs"], {"mode": "max-autotune-no-cudagraphs"}),
    ],
)
def test_generate_cli_compile_modes(uncond_ckpt: Path, tmp_path: Path, monkeypatch, flag, options) -> None:
    """``--compile [MODE]`` compiles the whole DiT once with that mode (no CUDA graphs: the sampler
    feeds outputs back in); without the flag nothing is compiled. The compilation itself is stubbed:
    Inductor's CPU code is not what this checks."""
    calls = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: calls.append((type(self).__name__, kwargs)))
    base = [
        "--ckpt",
        str(uncond_ckpt),
        "--steps",
        "1",
        "--cfg",
        "1",
        "--seeds",
        "0-1",
        "--out",
        str(tmp_path / "c.npz"),
    ]
    assert _script().main([*base, *flag]) == 0
    assert calls == ([] if options is None else [("DiT", options)])


def test_generate_cli_gelu_epilogue_is_set_before_compiling(uncond_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """``--gelu-epilogue`` switches every block's fused fc1 + GELU on before ``--compile`` traces the
    network (the compiled graph bakes the choice in); on a CPU the images equal the unfused run's."""
    seen = []
    monkeypatch.setattr(
        torch.nn.Module, "compile", lambda self, **kwargs: seen.extend(b.mlp.gelu_epilogue for b in self.blocks)
    )
    base = ["--ckpt", str(uncond_ckpt), "--steps", "1", "--cfg", "1", "--seeds", "0-1", "--compile"]
    assert _script().main([*base, "--out", str(tmp_path / "plain.npz")]) == 0
    assert seen and not any(seen)
    seen.clear()
    assert _script().main([*base, "--gelu-epilogue", "--out", str(tmp_path / "fused.npz")]) == 0
    assert seen and all(seen)
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "fused.npz") as fused:
        np.testing.assert_array_equal(plain["images"], fused["images"])


def test_generate_cli_fp8_quantizes_before_compiling(uncond_ckpt: Path, tmp_path: Path, monkeypatch) -> None:
    """``--fp8`` swaps the blocks' linear layers for FP8 ones before ``--compile`` traces the network; the
    images stay within a few uint8 levels of the unquantized run's (this checkpoint's network is near its
    initialisation, so they may be equal; tests/models/test_fp8.py checks the numerics)."""
    seen = []
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **kwargs: seen.append(self.fp8))
    base = ["--ckpt", str(uncond_ckpt), "--steps", "1", "--cfg", "1", "--seeds", "0-3", "--compile"]
    assert _script().main([*base, "--out", str(tmp_path / "plain.npz")]) == 0
    assert _script().main([*base, "--fp8", "--out", str(tmp_path / "fp8.npz")]) == 0
    assert seen == [False, True]
    with np.load(tmp_path / "plain.npz") as plain, np.load(tmp_path / "fp8.npz") as fp8:
        a, b = plain["images"].astype(np.float64), fp8["images"].astype(np.float64)
    assert np.abs(a - b).mean() < 4  # uint8 levels


def test_generate_cli_refuses_fp8_with_the_gelu_epilogue(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        _script().main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "x"), "--fp8", "--gelu-epilogue"])
    assert "cannot be combined" in capsys.readouterr().err


def test_generate_cli_refuses_cuda_graph_compile_modes(tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        _script().main(["--ckpt", str(tmp_path), "--out", str(tmp_path / "o"), "--compile", "reduce-overhead"])
    assert "invalid choice: 'reduce-overhead'" in capsys.readouterr().err


def test_generate_cli_refuses_existing_output_without_force(cond_ckpt: Path, tmp_path: Path, capsys) -> None:
    """An existing .npz or a folder with files is refused (nothing written); --force replaces it and
    leaves none of the folder's old images behind (they would mix with the new set)."""
    script = _script()
    folder, npz = tmp_path / "png", tmp_path / "set.npz"
    folder.mkdir()
    (folder / "000009.png").write_bytes(b"old image")
    (folder / "notes.txt").write_text("mine")
    npz.write_bytes(b"old archive")
    base = ["--ckpt", str(cond_ckpt), "--steps", "1", "--seeds", "0-2"]
    for out in (folder, npz):
        assert script.main([*base, "--out", str(out)]) == 1
        last = capsys.readouterr().err.splitlines()[-1]
        assert last.startswith(f"generate.py: error: {out} ") and "pass --force to overwrite" in last
    assert sorted(p.name for p in folder.iterdir()) == ["000009.png", "notes.txt"]
    assert npz.read_bytes() == b"old archive"
    assert script.main([*base, "--out", str(folder), "--force"]) == 0
    assert sorted(p.name for p in folder.iterdir()) == ["000000.png", "000001.png", "000002.png", "notes.txt"]
    assert script.main([*base, "--out", str(npz), "--force"]) == 0
    with np.load(npz) as data:
        np.testing.assert_array_equal(data["seeds"], [0, 1, 2])
    empty = tmp_path / "empty"
    empty.mkdir()
    assert script.main([*base, "--out", str(empty)]) == 0  # an empty folder holds nothing to mix with


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--steps", "0", "argument --steps: must be >= 1, got 0"),
        ("--cfg", "0.5", "argument --cfg: the guidance scale must be >= 1 (1 = unguided), got 0.5"),
        ("--batch", "-1", "argument --batch: must be >= 1, got -1"),
    ],
)
def test_generate_cli_checks_steps_and_cfg_before_loading(tmp_path: Path, capsys, flag, value, message) -> None:
    """Bad values fail at argument parsing (exit 2), before any checkpoint is looked at."""
    with pytest.raises(SystemExit) as exit_info:
        _script().main(["--ckpt", str(tmp_path / "missing"), "--out", str(tmp_path / "o"), flag, value])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(message)
    assert not (tmp_path / "o").exists()
