"""Fault 6: untrusted files — crafted pickles that would run code when loaded.

Documented outcome (tvm/runtime/checkpoint.py, tvm/compat/upstream.py): our checkpoints are read with
``torch.load(weights_only=True)`` only; the authors' pickles and other outside pickles go through a
restricted unpickler; a crafted file is refused with an error naming it (or, as the newest file of
a run directory, skipped with a warning naming it) and runs nothing. Every file the crafted pickles
would create (``touch MARKER`` through ``os.system``) must be absent afterwards.

The loaders' own tests (tests/compat, tests/eval/test_fid.py, tests/runtime/test_checkpoint.py) feed
crafted pickles to each loader; here they go through the entry points — auto-resume, ``resume``,
``transfer``, ``eval.py``'s library, ``generate.py``'s loader, a dataset — and a static scan checks
that no deserialisation call outside the reviewed ones exists in the package and its scripts.
"""

from __future__ import annotations

import ast
import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from fault_tools import in_process_run, load_final, same_training_state
from helpers import QUICK_TINY
from tvm.compat.upstream import UnsafePickleError
from tvm.config import compose_config
from tvm.eval.checkpoints import load_network_for_eval
from tvm.eval.evaluate import evaluate_checkpoints
from tvm.runtime.checkpoint import FORMAT, CheckpointError

ROOT = Path(__file__).resolve().parents[2]
QUICK = QUICK_TINY + ["training.total_ticks=2", "training.ckpt_ticks=1", "training.snapshot_ticks=1000"]


class Exploit:
    """Unpickling this runs ``touch <marker>`` (``os.system``); a safe loader refuses it first."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _crafted(kind: str, path: Path, marker: Path) -> Path:
    """A file that runs code when loaded carelessly: a torch archive whose pickle calls
    ``os.system`` (everything else looks like our checkpoint), or a bare pickle."""
    if kind == "torch archive":
        torch.save(
            {
                "format": FORMAT,
                "version": 1,
                "net": {"w": torch.ones(1)},
                "ema": Exploit(marker),
                "progress": {"step": 6},
            },
            path,
        )
    else:
        path.write_bytes(pickle.dumps({"net": Exploit(marker), "format": FORMAT}))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("source")
    in_process_run(QUICK + [f"run_dir={run_dir}"])
    return run_dir


@pytest.mark.parametrize("kind", ["torch archive", "bare pickle"])
def test_crafted_checkpoint_runs_nothing_at_any_entry_point(kind: str, source: Path, tmp_path: Path, ledger) -> None:
    marker = tmp_path / "MARKER"
    crafted = _crafted(kind, tmp_path / "checkpoint-00000006.pt", marker)
    outcomes: dict[str, bool] = {}
    for key in ("training.resume", "training.transfer"):
        with pytest.raises(CheckpointError, match=str(crafted)):
            in_process_run(QUICK + [f"run_dir={tmp_path / 'run'}", f"{key}={crafted}"])
        outcomes[key] = not marker.exists()
    with pytest.raises(CheckpointError, match=str(crafted)):
        evaluate_checkpoints(compose_config("tiny", [f"eval.resume={crafted}", "eval.metrics=[digits]"]))
    outcomes["eval"] = not marker.exists()
    with pytest.raises(CheckpointError, match=str(crafted)):
        load_network_for_eval(crafted)  # scripts/generate.py's loader
    outcomes["generate"] = not marker.exists()
    # Planted as the newest checkpoint of a run directory: skipped, the run resumes from the real one.
    run_dir = tmp_path / "planted"
    shutil.copytree(source, run_dir)
    (run_dir / "checkpoint-00000004.pt").unlink()
    shutil.copy(crafted, run_dir / "checkpoint-00000004.pt")
    with pytest.warns(RuntimeWarning, match=r"skipping unreadable checkpoint: .*checkpoint-00000004\.pt"):
        in_process_run(QUICK + [f"run_dir={run_dir}"])
    outcomes["auto-resume"] = not marker.exists() and same_training_state(load_final(run_dir), load_final(source)) == []
    for entry, ok in outcomes.items():
        ledger.record(f"untrusted: crafted checkpoint ({kind}) via {entry}", ok)
    assert all(outcomes.values()), outcomes
    _careless_load(crafted)  # positive control: the file does run code when loaded carelessly
    assert marker.exists()


def _careless_load(path: Path) -> None:
    """What the safe loaders avoid: a plain unpickling (the crafted files then run their code)."""
    if zipfile.is_zipfile(path):
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())


def test_crafted_upstream_pickle_is_refused_by_eval(tmp_path: Path, ledger) -> None:
    """An authors'-style ``network-snapshot-*.pkl`` given to eval goes to the restricted unpickler."""
    marker = tmp_path / "MARKER"
    crafted = _crafted("bare pickle", tmp_path / "network-snapshot-000100.pkl", marker)
    with pytest.raises(UnsafePickleError, match=rf"{crafted}.*refusing global '(posix|os)\.system'"):
        evaluate_checkpoints(compose_config("im256_w2", [f"eval.resume={crafted}", "eval.metrics=[digits]"]))
    ledger.record("untrusted: crafted upstream .pkl via eval", not marker.exists())
    assert not marker.exists()
    _careless_load(crafted)
    assert marker.exists()


def test_pickled_array_in_a_dataset_is_refused(tmp_path: Path, ledger) -> None:
    """``.npy`` files (latent datasets) are read with ``allow_pickle=False``: an object array is refused."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "latents.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for i in range(4):
            buffer = io.BytesIO()
            array = np.empty((8, 4, 4), dtype=object) if i == 2 else np.zeros((8, 4, 4), np.float32)
            if i == 2:
                array[0, 0, 0] = Exploit(marker)
            np.save(buffer, array, allow_pickle=True)
            archive.writestr(f"00000/img-mean-std-{i:08d}.npy", buffer.getvalue())
        archive.writestr("dataset.json", json.dumps({"labels": None}))
    with pytest.raises(ValueError, match=r"img-mean-std-00000002\.npy.*unsupported dtype object"):
        in_process_run(
            QUICK
            + [
                f"run_dir={tmp_path / 'run'}",
                f"dataset.path={path}",
                "dataset.use_labels=false",
                "dataset.class_name=tvm.data.datasets.ImageFolderDataset",
            ]
        )
    ledger.record("untrusted: pickled array in a dataset", not marker.exists())
    assert not marker.exists()
    with zipfile.ZipFile(path) as archive:
        np.load(io.BytesIO(archive.read("00000/img-mean-std-00000002.npy")), allow_pickle=True)
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# Static scan: every deserialisation call site is a safe one or a reviewed exception
# ---------------------------------------------------------------------------------------------

SCANNED = ["tvm", "kernels", "scripts", "train.py", "eval.py", "launch.py"]
# (file, call) → why it is acceptable. Anything else that can run code from a file fails the scan.
REVIEWED = {
    ("tvm/eval/fid.py", "pickle.load"): "NVIDIA's StyleGAN3 Inception pickle embeds and runs its source code by "
    "design; it is read only from eval.detector_url (a configured, trusted source) and only with dnnlib installed",
    ("tvm/eval/fid.py", "torch.jit.load"): "TorchScript detector from eval.detector_url (no Python pickle)",
    ("tvm/eval/extra_metrics.py", "torch.jit.load"): "TorchScript DINOv2 from eval.dinov2 (no Python pickle)",
    ("tvm/eval/extra_metrics.py", "torch.hub.load"): "DINOv2's hubconf from eval.dinov2: a local checkout or "
    "its torch.hub cache, downloaded only with eval.dinov2_allow_download=true",
}
UNSAFE = {
    "pickle.load",
    "pickle.loads",
    "pickle.Unpickler",
    "_pickle.load",
    "_pickle.loads",
    "marshal.loads",
    "marshal.load",
    "yaml.load",
    "yaml.unsafe_load",
    "dill.load",
    "dill.loads",
    "joblib.load",
    "shelve.open",
    "torch.jit.load",
    "torch.hub.load",
    "eval",
    "exec",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return "?"


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _problems(path: Path, root: Path = ROOT) -> list[str]:
    rel = path.relative_to(root).as_posix()
    tree = ast.parse(path.read_text(), filename=rel)
    aliases = {"np": "numpy"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname: a.name for a in node.names if a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module in ("pickle", "_pickle", "marshal", "dill"):
            return [f"{rel}:{node.lineno}: imports names from {node.module} (use the module: the scan sees calls)"]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and any(_dotted(b).endswith("Unpickler") for b in node.bases):
            if not any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body):
                found.append(f"{rel}:{node.lineno}: Unpickler subclass {node.name} without find_class")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        head, _, rest = name.partition(".")
        name = f"{aliases.get(head, head)}.{rest}" if rest else aliases.get(head, head)
        where = f"{rel}:{node.lineno}: {name}"
        if name == "torch.load":
            weights_only = _keyword(node, "weights_only")
            module = _keyword(node, "pickle_module")
            restricted = isinstance(module, ast.Call) and _dotted(module.func) == "restricted_pickle_module"
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True) and not restricted:
                found.append(f"{where} without weights_only=True or the restricted pickle module")
        elif name == "numpy.load":
            allow = _keyword(node, "allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{where} with allow_pickle not False")
        elif name in UNSAFE and (rel, name) not in REVIEWED:
            found.append(f"{where} can run code from a file; make it safe or review it in REVIEWED")
    return found


def test_every_deserialisation_call_site_is_safe_or_reviewed(ledger) -> None:
    files = [
        p
        for entry in SCANNED
        for p in ((ROOT / entry).rglob("*.py") if (ROOT / entry).is_dir() else [ROOT / entry])
        if p.exists()
    ]
    assert len(files) > 20
    problems = [problem for path in files for problem in _problems(path)]
    ledger.record("untrusted: static scan of deserialisation call sites", problems == [])
    assert problems == [], "\n".join(problems)


def test_the_scan_finds_unsafe_calls(tmp_path: Path) -> None:
    """The scan itself can fail: each unsafe line of this sample is reported."""
    sample = tmp_path / "sample.py"
    sample.write_text(
        "\n".join(
            [
                "import pickle, torch, numpy as np",
                "pickle.loads(b'')",
                "torch.load('x')",
                "torch.load('x', weights_only=False)",
                "np.load('x', allow_pickle=True)",
                "eval('1')",
                "torch.load('x', weights_only=True)",
                "np.load('x')",
                "class U(pickle.Unpickler):\n    pass",
            ]
        )
    )
    problems = _problems(sample, tmp_path)
    assert sorted(int(p.split(":")[1]) for p in problems) == [2, 3, 4, 5, 6, 9], problems
