"""Checkpoint format, atomic writes, rotation and safe loading (tvm/runtime/checkpoint.py)."""

from __future__ import annotations

import errno
import os
import pickle
import random
import signal
import subprocess
import sys
import textwrap
import time
from collections import OrderedDict
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from tvm.runtime import checkpoint as ckpt
from tvm.runtime.checkpoint import CheckpointError, CheckpointManager, CheckpointWriteError


def _state(step: int = 1, size: int = 8) -> dict:
    net = torch.nn.Linear(size, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    net(torch.randn(3, size)).sum().backward()
    opt.step()
    return {
        "net": net.state_dict(),
        "ema": OrderedDict(w=torch.full((size,), float(step), dtype=torch.bfloat16)),
        "optimizer": opt.state_dict(),
        "sampler": {"epoch": 2, "position": 17, "order": torch.arange(5)},
        "rng": ckpt.capture_rng_state(),
        "config": {"name": "test", "training": {"batch_size": 4, "betas": [0.9, 0.95], "seed": None}},
        "progress": {"step": step, "nimg": 4 * step, "tick": step // 10},
    }


def _temp_files(directory: Path) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.endswith(ckpt.TEMP_SUFFIX)]


def _assert_same(a, b) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            _assert_same(x, y)
    else:
        assert a == b


def test_round_trip_with_weights_only(tmp_path: Path) -> None:
    state = _state(step=3)
    path = ckpt.save_checkpoint(tmp_path / "c.pt", state)
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ckpt.FORMAT and raw["version"] == ckpt.VERSION
    loaded = ckpt.load_checkpoint(path, require=("net", "optimizer"))
    for key in state:
        _assert_same(state[key], loaded[key])
    assert all(t.device.type == "cpu" for t in loaded["net"].values())
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # readable by the team, like torch.save


def test_saved_tensors_are_detached_plain_tensors(tmp_path: Path) -> None:
    param = torch.nn.Parameter(torch.ones(3))
    ckpt.save_checkpoint(tmp_path / "c.pt", {"p": param * 2, "q": param})
    loaded = ckpt.load_checkpoint(tmp_path / "c.pt")
    assert type(loaded["q"]) is torch.Tensor and not loaded["p"].requires_grad


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_tensors_are_saved_on_cpu(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path / "c.pt", {"w": torch.ones(3, device="cuda")})
    assert torch.load(tmp_path / "c.pt", weights_only=True, map_location=None)["w"].device.type == "cpu"


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"sampler": {"order": np.zeros(3)}}, "state['sampler']['order'] is numpy.ndarray"),
        ({"sampler": {"pos": np.float64(1.0)}}, "state['sampler']['pos'] is numpy.float64"),
        ({"config": [Fraction(1, 3)]}, "state['config'][0] is fractions.Fraction"),
    ],
)
def test_unloadable_content_is_refused_before_writing(tmp_path: Path, state: dict, where: str) -> None:
    with pytest.raises(TypeError) as info:
        ckpt.save_checkpoint(tmp_path / "c.pt", state)
    assert where in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_failure_inside_torch_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, _state(step=1))

    def partial_then_disk_full(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", partial_then_disk_full)
    with pytest.raises(CheckpointWriteError, match=r"disk is full") as info:
        ckpt.save_checkpoint(path, _state(step=2))
    assert str(path) in str(info.value) and info.value.errno == errno.ENOSPC
    assert ckpt.load_checkpoint(path)["progress"]["step"] == 1
    assert _temp_files(tmp_path) == []


def test_failure_in_replace_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "c.pt"
    ckpt.save_checkpoint(path, _state(step=1))

    def failing_replace(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt.os, "replace", failing_replace)
    with pytest.raises(CheckpointError, match=str(path)):
        ckpt.save_checkpoint(path, _state(step=2))
    assert ckpt.load_checkpoint(path)["progress"]["step"] == 1
    assert _temp_files(tmp_path) == []


def test_keyboard_interrupt_during_write_removes_temp_file(tmp_path: Path, monkeypatch) -> None:
    def interrupted(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(tmp_path / "c.pt", {"x": torch.ones(1)})
    assert list(tmp_path.iterdir()) == []


def test_missing_directory_gives_clear_error(tmp_path: Path) -> None:
    target = tmp_path / "no" / "such" / "dir" / "c.pt"
    with pytest.raises(CheckpointWriteError, match=r"does not exist") as info:
        ckpt.save_checkpoint(target, {"x": torch.ones(1)})
    assert str(target) in str(info.value)


def test_unwritable_directory_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    directory = tmp_path / "ro"
    directory.mkdir()
    if os.geteuid() == 0:  # root ignores permission bits: simulate what the kernel would say

        def denied(*args, **kwargs):
            raise PermissionError(errno.EACCES, "Permission denied")

        monkeypatch.setattr(ckpt, "open", denied, raising=False)
    else:
        directory.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match=r"not writable") as info:
            ckpt.save_checkpoint(directory / "c.pt", {"x": torch.ones(1)})
    finally:
        directory.chmod(0o700)
    assert str(directory / "c.pt") in str(info.value)
    assert list(directory.iterdir()) == []


def test_truncated_file_raises_checkpoint_error_naming_it(tmp_path: Path) -> None:
    path = ckpt.save_checkpoint(tmp_path / "c.pt", _state())
    data = path.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 5):
        broken = tmp_path / f"cut-{cut}.pt"
        broken.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=str(broken)):
            ckpt.load_checkpoint(broken)


def test_foreign_files_are_rejected(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"hello world" * 100)
    with pytest.raises(CheckpointError, match=r"garbage\.pt.*not a torch zip archive"):
        ckpt.load_checkpoint(garbage)

    other = tmp_path / "other.pt"
    torch.save({"net": {"w": torch.ones(1)}}, other)
    with pytest.raises(CheckpointError, match=r"other\.pt is not a TVM checkpoint"):
        ckpt.load_checkpoint(other)

    pickled = tmp_path / "pickled.pt"
    torch.save({"format": ckpt.FORMAT, "version": 1, "obj": Fraction(1, 3)}, pickled)
    with pytest.raises(CheckpointError, match=r"pickled\.pt.*weights_only refused"):
        ckpt.load_checkpoint(pickled)

    plain_pickle = tmp_path / "upstream.pkl"
    plain_pickle.write_bytes(pickle.dumps({"net": 1}))
    with pytest.raises(CheckpointError, match=r"upstream\.pkl"):
        ckpt.load_checkpoint(plain_pickle)

    with pytest.raises(CheckpointError, match=r"missing\.pt does not exist"):
        ckpt.load_checkpoint(tmp_path / "missing.pt")


def test_version_and_required_keys_are_checked(tmp_path: Path) -> None:
    future = tmp_path / "future.pt"
    torch.save({"format": ckpt.FORMAT, "version": ckpt.VERSION + 1}, future)
    with pytest.raises(CheckpointError, match=r"future\.pt has checkpoint version"):
        ckpt.load_checkpoint(future)
    path = ckpt.save_checkpoint(tmp_path / "c.pt", {"net": {}})
    with pytest.raises(CheckpointError, match=r"lacks required keys \['ema'\]"):
        ckpt.load_checkpoint(path, require=("net", "ema"))


def test_rng_state_round_trip(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached Gaussian in Python's generator
    ckpt.save_checkpoint(tmp_path / "c.pt", {"rng": ckpt.capture_rng_state()})
    expected = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item())
    ckpt.restore_rng_state(ckpt.load_checkpoint(tmp_path / "c.pt")["rng"])
    assert (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(1).item()) == expected


def test_wrapper_prefixes_are_removed() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(2, 2))
    compiled = torch.compile(net)  # lazily compiled: creating the wrapper does not compile
    assert ckpt.unwrap_module(compiled) is net
    assert list(ckpt.module_state_dict(compiled)) == ["0.weight", "0.bias"]
    assert list(ckpt.strip_wrapper_prefixes({"module._orig_mod.a": 1, "b": 2})) == ["a", "b"]
    with pytest.raises(CheckpointError, match="collides"):
        ckpt.strip_wrapper_prefixes({"module.a": 1, "a": 2})


def test_manager_keeps_last_n_and_snapshots(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path / "run", keep_last=2, snapshot_every_steps=4)
    for step in range(1, 11):
        path = manager.save({"progress": {"step": step}}, step)
        assert path.name == f"checkpoint-{step:08d}.pt"
    assert [ckpt.checkpoint_step(p) for p in manager.all()] == [10, 9, 8, 4]
    assert manager.latest() == manager.path_for(10)


def test_manager_without_snapshots_and_older_step_never_deletes_new_file(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save({"x": torch.ones(1)}, 5)
    manager.save({"x": torch.ones(1)}, 6)
    assert [p.name for p in manager.all()] == ["checkpoint-00000006.pt"]
    with pytest.warns(RuntimeWarning, match="newer than checkpoint-00000003.pt"):
        manager.save({"x": torch.ones(1)}, 3)
    assert [ckpt.checkpoint_step(p) for p in manager.all()] == [6, 3]


def test_latest_skips_corrupt_newest(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=3)
    for step in (1, 2):
        manager.save({"progress": {"step": step}}, step)
    newest = manager.path_for(3)
    newest.write_bytes(manager.path_for(2).read_bytes()[:100])
    with pytest.warns(RuntimeWarning, match=r"checkpoint-00000003\.pt"):
        assert manager.latest() == manager.path_for(2)
    with pytest.warns(RuntimeWarning, match=r"checkpoint-00000003\.pt"):
        path, content = manager.load_latest()
    assert path == manager.path_for(2) and content["progress"]["step"] == 2
    assert CheckpointManager(tmp_path / "empty").latest() is None


def test_stray_temp_files_are_ignored_and_cleaned(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path)
    manager.save({"progress": {"step": 1}}, 1)
    stray = tmp_path / ".checkpoint-00000002.pt.abc123.tmp"
    stray.write_bytes(b"partial")
    assert manager.all() == [manager.path_for(1)] and manager.latest() == manager.path_for(1)
    manager.save({"progress": {"step": 2}}, 2)
    assert not stray.exists()


def test_find_checkpoints(tmp_path: Path) -> None:
    manager = CheckpointManager(tmp_path, keep_last=5)
    for step in (3, 20, 100):
        manager.save({}, step)
    for name in ("checkpoint-latest.pt", "network-snapshot-000500.pkl", "notes.txt"):
        (tmp_path / name).write_text("x")
    assert [ckpt.checkpoint_step(p) for p in ckpt.find_checkpoints(tmp_path)] == [100, 20, 3]
    assert ckpt.find_checkpoints(manager.path_for(20)) == [manager.path_for(20)]
    with pytest.raises(CheckpointError, match="nope"):
        ckpt.find_checkpoints(tmp_path / "nope")


_WRITER = textwrap.dedent(
    """
    import sys, torch
    from tvm.runtime.checkpoint import CheckpointManager
    manager = CheckpointManager(sys.argv[1], keep_last=2)
    step = int(sys.argv[2])
    weights = torch.empty(2_000_000)
    while True:
        step += 1
        weights.fill_(step)
        manager.save({"net": {"w": weights}, "progress": {"step": step}}, step)
        print(step, flush=True)
    """
)


def test_kill_9_during_checkpoint_loop_leaves_loadable_latest(tmp_path: Path) -> None:
    """SIGKILL a process that writes 8 MB checkpoints back to back, at random moments, repeatedly."""
    rng = random.Random(0)
    manager = CheckpointManager(tmp_path, keep_last=2)
    start = 0
    for _ in range(3):
        child = subprocess.Popen(
            [sys.executable, "-c", _WRITER, str(tmp_path), str(start)], stdout=subprocess.PIPE, text=True
        )
        try:
            last_reported = int(child.stdout.readline())  # at least one complete checkpoint
            time.sleep(rng.uniform(0.0, 0.5))
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            child.stdout.close()
        path, content = manager.load_latest()
        step = content["progress"]["step"]
        assert step >= last_reported and path == manager.path_for(step)
        assert torch.equal(content["net"]["w"], torch.full((2_000_000,), float(step)))
        start = step
    manager.save({"progress": {"step": start + 1}}, start + 1)
    assert _temp_files(tmp_path) == []
