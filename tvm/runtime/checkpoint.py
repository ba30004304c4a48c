"""Training checkpoints: the on-disk format, atomic writes, rotation and safe loading.

A checkpoint is one ``torch.save`` file holding *only* plain containers (dict, list, tuple), plain
scalars/strings and tensors, so that it loads with ``torch.load(..., weights_only=True)``: no
module objects, no pickled classes, no OmegaConf nodes (docs/method.md §11 items 18-19: upstream pickled
whole, possibly ``torch.compile``-wrapped modules straight from GPU memory). The training loop
decides the content; the conventional layout is::

    {"format": "tvm-checkpoint", "version": 1,
     "net": state_dict, "ema": state_dict, "ema_target": state_dict,
     "optimizer": state_dict, "rng": dict of tensors, "config": plain dict,
     "data": {"resolution": int, "channels": int, "label_dim": int},
     "progress": {"step": int, "nimg": int, "tick": int, "skipped": int, "in_row": int}}

(Checkpoints written before issue 16 also hold ``"sampler": {"index": int}``, the data position
``step × batch``; nothing reads it, since the position follows from ``progress``.)

``save_checkpoint`` stamps ``format``/``version`` itself and moves every tensor to the CPU, so
files never hold CUDA storages (docs/method.md §11 item 16) and load on any machine.

Writes are atomic (temporary file in the same directory, fsync, ``os.replace``, fsync of the
directory): a crash, ``kill -9`` or full disk at any moment leaves either the previous file or the
complete new one, never a torn file under the final name (docs/method.md §5.4 items 3-5, where upstream
overwrote ``training-state-latest.pt`` in place and ignored failures).

Only rank 0 may write. Nothing here checks the rank: the caller gates every ``save`` call with
``tvm.runtime.distributed.is_main()``; all ranks may read.
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import re
import uuid
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "tvm-checkpoint"
VERSION = 1
CHECKPOINT_PREFIX = "checkpoint"
TEMP_SUFFIX = ".tmp"

_CHECKPOINT_NAME = re.compile(rf"^{CHECKPOINT_PREFIX}-(\d+)\.pt$")
# Exact types: subclasses such as numpy.float64 (a float subclass) are refused by weights_only.
_PLAIN_LEAVES = (str, bytes, int, float, bool, complex, type(None), torch.Size, torch.dtype, torch.device)
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")


class CheckpointError(RuntimeError):
    """A checkpoint could not be read, written or is not in our format; the message names the file."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed; any previous file under that name is untouched.

    ``errno`` carries the operating-system error number when there is one (e.g. ``errno.ENOSPC``
    for a full disk) so that a caller can decide whether to retry or stop.
    """

    def __init__(self, message: str, path: Path, os_errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = os_errno


# ---------------------------------------------------------------------------------------------
# Content helpers
# ---------------------------------------------------------------------------------------------


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """Return the plain module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``).

    Why: state dicts of wrapped modules carry ``module.``/``_orig_mod.`` prefixes, which made
    upstream's checkpoints depend on how the run was launched (docs/method.md §5.6, §11 item 19).
    """
    while True:
        if hasattr(module, "_orig_mod") and isinstance(module._orig_mod, torch.nn.Module):
            module = module._orig_mod
        elif isinstance(module, torch.nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


def strip_wrapper_prefixes(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Remove leading ``_orig_mod.`` / ``module.`` prefixes from every key (in any nesting order)."""
    cleaned: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = key
        while name.startswith(_WRAPPER_PREFIXES):
            name = name.split(".", 1)[1]
        if name in cleaned:
            raise CheckpointError(f"state dict key {key!r} collides with another key after removing wrapper prefixes")
        cleaned[name] = value
    return cleaned


def state_dict_differences(
    expected: Mapping[str, Any], given: Mapping[str, Any]
) -> tuple[list[str], list[str], list[str]]:
    """Keys of ``given`` against ``expected``: (missing, unexpected, shape-mismatched), in order."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    mismatched = [
        key
        for key, value in expected.items()
        if key in given and tuple(getattr(given[key], "shape", ())) != tuple(value.shape)
    ]
    return missing, unexpected, mismatched


def module_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict of the unwrapped module with canonical (prefix-free) parameter names."""
    return strip_wrapper_prefixes(unwrap_module(module).state_dict())


def to_cpu(obj: Any) -> Any:
    """Copy of ``obj`` with every tensor detached and on the CPU; containers are rebuilt.

    Dicts keep their key order (``OrderedDict`` becomes ``dict``, which ``weights_only`` loads
    identically); tuples stay tuples. Non-tensor leaves are returned as they are.
    """
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        return {key: to_cpu(value) for key, value in obj.items()}
    if isinstance(obj, list):
        return [to_cpu(value) for value in obj]
    if isinstance(obj, tuple):
        return tuple(to_cpu(value) for value in obj)
    return obj


def check_plain(obj: Any, where: str = "state") -> None:
    """Raise ``TypeError`` naming the first entry that ``torch.load(weights_only=True)`` would refuse.

    Checking before writing turns an unloadable checkpoint (found only at resume time, possibly
    days later) into an immediate error that names the offending key, e.g.
    ``state['sampler']['order'] is numpy.ndarray``.
    """
    if isinstance(obj, torch.Tensor) or type(obj) in _PLAIN_LEAVES:
        return
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__} ({key!r}); use str or int keys")
            check_plain(value, f"{where}[{key!r}]")
        return
    if isinstance(obj, (list, tuple)):
        for index, value in enumerate(obj):
            check_plain(value, f"{where}[{index}]")
        return
    kind = f"{type(obj).__module__}.{type(obj).__qualname__}"
    raise TypeError(
        f"{where} is {kind}, which weights_only loading refuses; store tensors, plain containers, "
        "numbers or strings instead (e.g. torch.as_tensor(array), OmegaConf.to_container(cfg))"
    )


def capture_rng_state() -> dict[str, torch.Tensor]:
    """Snapshot of the Python, NumPy (legacy global), torch CPU and CUDA generators as tensors.

    Why: docs/method.md §11 item 10 — upstream did not restore RNG state on resume. Per-step draws come
    from ``distributed.step_generator`` and do not need this, but data augmentation or any
    library using the global generators does.
    """
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    if np_kind != "MT19937":
        raise CheckpointError(f"cannot capture NumPy RNG state of kind {np_kind!r}")
    state = {
        "python": torch.tensor([py_version, *py_internal], dtype=torch.int64),
        "python_gauss": torch.tensor([] if py_gauss is None else [py_gauss], dtype=torch.float64),
        "numpy_keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64).copy()),
        "numpy_misc": torch.tensor([np_pos, np_has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_gauss], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of ``capture_rng_state``. CUDA states are restored only if the device count matches."""
    py = state["python"].tolist()
    gauss = state["python_gauss"].tolist()
    random.setstate((int(py[0]), tuple(int(v) for v in py[1:]), gauss[0] if gauss else None))
    pos, has_gauss = (int(v) for v in state["numpy_misc"].tolist())
    keys = state["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, pos, has_gauss, float(state["numpy_gauss"][0])))
    torch.set_rng_state(state["torch"].cpu())
    if "cuda" in state and torch.cuda.is_available():
        saved = state["cuda"].cpu()
        if saved.shape[0] == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(saved))
        else:
            warnings.warn(
                f"checkpoint holds {saved.shape[0]} CUDA RNG states but {torch.cuda.device_count()} devices "
                "are visible; CUDA RNG state not restored",
                RuntimeWarning,
                stacklevel=2,
            )


# ---------------------------------------------------------------------------------------------
# Single files
# ---------------------------------------------------------------------------------------------


def _fsync_directory(directory: Path) -> None:
    """Make a rename in ``directory`` durable. Best effort: some systems cannot fsync directories."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path: Path) -> None:
    path.unlink(missing_ok=True)


def _write_error(path: Path, exc: BaseException) -> CheckpointWriteError:
    os_errno = exc.errno if isinstance(exc, OSError) else None
    if os_errno == errno.ENOSPC or "No space left" in str(exc):
        reason = "the disk is full (ENOSPC)"
        os_errno = errno.ENOSPC
    elif os_errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        reason = f"the directory {path.parent} is not writable ({os.strerror(os_errno)})"
    elif os_errno == errno.ENOENT:
        reason = f"the directory {path.parent} does not exist"
    else:
        reason = f"{type(exc).__name__}: {exc}"
    return CheckpointWriteError(
        f"could not write checkpoint {path}: {reason}; any previous file at that path is unchanged", path, os_errno
    )


def save_checkpoint(path: str | os.PathLike[str], state: Mapping[str, Any]) -> Path:
    """Atomically write ``state`` to ``path`` and return the path.

    Steps: stamp ``format``/``version``, copy tensors to the CPU, check that everything is
    weights_only-loadable (``TypeError`` naming the key otherwise), ``torch.save`` into a
    temporary file next to ``path``, flush + fsync it, ``os.replace`` it onto ``path`` and fsync
    the directory. On any failure the temporary file is removed, an existing file at ``path`` is
    left unchanged and ``CheckpointWriteError`` (a ``CheckpointError``) names the path and reason.

    Call on rank 0 only (the caller gates it). The parent directory must exist.
    """
    path = Path(path)
    if not isinstance(state, Mapping):
        raise TypeError(f"checkpoint state for {path} must be a mapping, got {type(state).__name__}")
    payload = to_cpu({**state, "format": FORMAT, "version": VERSION})
    check_plain(payload)

    temp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}"
    try:
        handle = open(temp, "xb")  # exclusive create; unlike mkstemp it honours the umask (0644)
    except OSError as exc:
        raise _write_error(path, exc) from exc
    try:
        with handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException as exc:
        _remove_quietly(temp)
        if isinstance(exc, Exception):
            raise _write_error(path, exc) from exc
        raise
    _fsync_directory(path.parent)
    return path


def validate_checkpoint(obj: Any, path: str | os.PathLike[str] = "<memory>", require: tuple[str, ...] = ()) -> dict:
    """Check that ``obj`` is a TVM checkpoint dict (format, version, progress counters, keys).

    Raises ``CheckpointError`` naming ``path`` and the problem; returns ``obj`` otherwise.
    """
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} is not a TVM checkpoint: top level is {type(obj).__name__}, expected dict")
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not a TVM checkpoint: 'format' is {obj.get('format')!r}, expected {FORMAT!r} "
            "(upstream .pkl/.pt files are read by tvm.compat.upstream)"
        )
    version = obj.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= VERSION:
        raise CheckpointError(f"{path} has checkpoint version {version!r}; this code reads versions 1..{VERSION}")
    progress = obj.get("progress")
    if progress is not None:
        if not isinstance(progress, dict):
            raise CheckpointError(f"{path}: 'progress' is {type(progress).__name__}, expected dict")
        for key, value in progress.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise CheckpointError(f"{path}: progress[{key!r}] is {value!r}, expected int")
    missing = [key for key in require if key not in obj]
    if missing:
        raise CheckpointError(f"{path} lacks required keys {missing}; it has {sorted(obj)}")
    return obj


def load_checkpoint(
    path: str | os.PathLike[str],
    map_location: str | torch.device = "cpu",
    require: tuple[str, ...] = (),
    mmap: bool = False,
) -> dict:
    """Load and validate a checkpoint with ``weights_only=True`` (always).

    A missing, truncated, corrupt or foreign file raises ``CheckpointError`` naming the file and
    the problem. ``require`` lists top-level keys that must be present. ``mmap=True`` maps tensor
    data lazily (cheap structural check; tensor bytes are read on first use).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist or is not a file")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot load checkpoint {path}: not a torch zip archive (truncated, corrupt, or not a checkpoint)"
        )
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if "Weights only load failed" in str(exc):
            problem = "it holds objects other than tensors and plain containers (weights_only refused it)"
        else:
            problem = f"the file is truncated or corrupt ({type(exc).__name__}: {first_line})"
        raise CheckpointError(f"cannot load checkpoint {path}: {problem}") from exc
    return validate_checkpoint(obj, path, require)


# ---------------------------------------------------------------------------------------------
# Run directories
# ---------------------------------------------------------------------------------------------


def checkpoint_step(path: str | os.PathLike[str]) -> int | None:
    """Step encoded in a ``checkpoint-<step>.pt`` file name, or None for any other name."""
    match = _CHECKPOINT_NAME.match(Path(path).name)
    return int(match.group(1)) if match else None


def _step_of(path: Path) -> int:
    """The step of a checkpoint this module listed or named (``checkpoint-<step>.pt``)."""
    step = checkpoint_step(path)
    assert step is not None, path
    return step


def _list_checkpoints(directory: Path) -> list[Path]:
    found = [(checkpoint_step(p), p) for p in directory.iterdir() if p.is_file()]
    return [p for step, p in sorted((sp for sp in found if sp[0] is not None), reverse=True)]


def find_checkpoints(path: str | os.PathLike[str]) -> list[Path]:
    """Checkpoints to evaluate, newest first: a file gives ``[file]``, a run directory its
    ``checkpoint-<step>.pt`` files sorted by step (other names are ignored).

    Why: docs/method.md §11 item 11 — upstream's eval sorted oldest first and crashed on names without an
    integer suffix. Raises ``CheckpointError`` if ``path`` does not exist.
    """
    path = Path(path)
    if path.is_file():
        return [path]
    if path.is_dir():
        return _list_checkpoints(path)
    raise CheckpointError(f"no checkpoint file or run directory at {path}")


class CheckpointManager:
    """Numbered checkpoints in one run directory with rotation and crash-safe resume.

    ``save`` writes ``checkpoint-{step:08d}.pt`` atomically, then prunes: it keeps the newest
    ``keep_last`` checkpoints plus every permanent snapshot (step divisible by
    ``snapshot_every_steps``), and deletes older ones only after the new file is on disk. Stray
    temporary files from interrupted writes are ignored by every listing and removed by ``save``.

    Only rank 0 calls ``save`` (the caller gates it); any rank may call ``latest``/``load_latest``.
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], keep_last: int = 3, snapshot_every_steps: int | None = None
    ) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        if snapshot_every_steps is not None and snapshot_every_steps < 1:
            raise ValueError(f"snapshot_every_steps must be >= 1 or None, got {snapshot_every_steps}")
        self.run_dir = Path(run_dir)
        self.keep_last = keep_last
        self.snapshot_every_steps = snapshot_every_steps

    def path_for(self, step: int) -> Path:
        """File name of the checkpoint for ``step``."""
        if step < 0:
            raise ValueError(f"checkpoint step must be >= 0, got {step}")
        return self.run_dir / f"{CHECKPOINT_PREFIX}-{step:08d}.pt"

    def is_snapshot(self, step: int) -> bool:
        """Whether ``step`` is a permanent snapshot that pruning never deletes."""
        return self.snapshot_every_steps is not None and step % self.snapshot_every_steps == 0

    def all(self) -> list[Path]:
        """All checkpoint files of the run, newest (highest step) first; [] if none."""
        if not self.run_dir.is_dir():
            return []
        return _list_checkpoints(self.run_dir)

    def remove_temp_files(self) -> list[Path]:
        """Delete leftovers of interrupted writes (``.checkpoint-*.tmp``); returns what was removed."""
        if not self.run_dir.is_dir():
            return []
        stray = sorted(self.run_dir.glob(f".{CHECKPOINT_PREFIX}-*{TEMP_SUFFIX}"))
        for path in stray:
            _remove_quietly(path)
        return stray

    def save(self, state: Mapping[str, Any], step: int) -> Path:
        """Write the checkpoint for ``step`` atomically, then prune old ones. Rank 0 only."""
        path = self.path_for(step)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.remove_temp_files()
        save_checkpoint(path, state)
        self._prune(just_written=path)
        return path

    def _prune(self, just_written: Path) -> None:
        existing = self.all()
        newer = [p for p in existing if _step_of(p) > _step_of(just_written)]
        if newer:
            warnings.warn(
                f"{self.run_dir} holds checkpoints newer than {just_written.name} "
                f"({', '.join(p.name for p in newer)}); latest() will prefer them",
                RuntimeWarning,
                stacklevel=3,
            )
        keep = set(existing[: self.keep_last]) | {just_written}
        for path in existing:
            if path not in keep and not self.is_snapshot(_step_of(path)):
                _remove_quietly(path)

    def latest(self) -> Path | None:
        """Newest checkpoint that loads and validates; corrupt newer ones are skipped with a warning.

        The check memory-maps the file (structure, pickle and format are verified; tensor bytes
        are not read). Use ``load_latest`` to get the content with a full read.
        """
        for path in self.all():
            try:
                load_checkpoint(path, mmap=True)
            except CheckpointError as exc:
                warnings.warn(f"skipping unreadable checkpoint: {exc}", RuntimeWarning, stacklevel=2)
                continue
            return path
        return None

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[Path, dict] | None:
        """``(path, content)`` of the newest fully loadable checkpoint, or None if there is none."""
        for path in self.all():
            try:
                return path, load_checkpoint(path, map_location=map_location)
            except CheckpointError as exc:
                warnings.warn(f"skipping unreadable checkpoint: {exc}", RuntimeWarning, stacklevel=2)
        return None


def file_sha256(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 16 MiB chunks (detector checks, provenance of converted pickles)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()
