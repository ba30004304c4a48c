"""Run logging: status lines, ``stats.jsonl``, a progress bar and optional wandb.

What goes where (docs/method.md §5.4 items 1 and 8, §5.8), rank 0 only:

* ``<run_dir>/log.txt`` — every line passed to ``RunLogger.log`` (also printed to stdout);
* ``<run_dir>/stats.jsonl`` — one JSON object per tick and per evaluation (``RunLogger.log_stats``);
* ``<run_dir>/training_curves.png`` — redrawn from ``stats.jsonl`` after each of its records:
  losses by t bin, gradient norm, img/s and metrics over steps (``tvm.runtime.plots``);
* progress over steps (``RunLogger.progress``): a tqdm bar on a terminal; in a redirected log no
  ``\r`` bar, only a plain line every few minutes (``tvm.progress``), since the tick lines report;
* wandb, only when asked for: imported lazily, so it is not a dependency.

Secrets: upstream kept the wandb key in the config (``logger.api_key``) and logged the whole config
to wandb. Here the key is read only from ``WANDB_API_KEY`` in the environment, which wandb reads
itself: it is never passed to any call, written to a file, or logged (``wandb.login`` is not
called because it stores the key in ``~/.netrc``). Config dicts are sanitised (secret-looking keys
dropped) and every text written is scrubbed of the key's value as a second line of defence.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
import uuid
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from tqdm import tqdm

from tvm.progress import LineProgress, format_duration, progress_bar
from tvm.runtime.plots import plot_training_curves

WANDB_MODES = ("disabled", "offline", "online")
API_KEY_ENV = "WANDB_API_KEY"
REDACTED = "<redacted>"
CURVES_FILE = "training_curves.png"
PLAIN_PROGRESS_SECONDS = 300.0  # redirected logs: one progress line per 5 minutes between tick lines

_SECRET_KEY = re.compile(r"(?:^|[_\-.])(?:api_?key|key|token|password|passwd|secret)$", re.IGNORECASE)


def is_secret_key(name: str) -> bool:
    """True for names like ``api_key``, ``wandb_key``, ``token``, ``auth_token``, ``password``, ``secret``."""
    return bool(_SECRET_KEY.search(str(name)))


def sanitize_config(config: Any) -> Any:
    """Copy of a plain config (dicts/lists) without secret-looking keys, at any depth.

    String values equal to the ``WANDB_API_KEY`` value are replaced by ``"<redacted>"`` too.
    """
    secret = os.environ.get(API_KEY_ENV)
    if isinstance(config, Mapping):
        return {key: sanitize_config(value) for key, value in config.items() if not is_secret_key(key)}
    if isinstance(config, (list, tuple)):
        return type(config)(sanitize_config(value) for value in config)
    if isinstance(config, str) and secret and secret in config:
        return config.replace(secret, REDACTED)
    return config


def _scrub(text: str) -> str:
    """Remove the API key's value from text before it is written or printed."""
    secret = os.environ.get(API_KEY_ENV)
    return text.replace(secret, REDACTED) if secret else text


# ---------------------------------------------------------------------------------------------
# Memory and the status line
# ---------------------------------------------------------------------------------------------


def peak_rss_gb() -> float | None:
    """Peak resident memory of this process in GB from ``resource`` (KB on Linux, bytes on
    macOS); None where ``resource`` does not exist (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20


def peak_memory_gb(device: torch.device | str) -> float | None:
    """Peak memory in GB: CUDA ``max_memory_allocated`` since the last reset on GPU, the process's
    peak RSS on CPU (docs/method.md §11 item 16: upstream called ``torch.cuda.max_memory_*`` always)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_gb()


def reset_peak_memory(device: torch.device | str) -> None:
    """Start a new peak-memory window (CUDA only; no-op elsewhere). Call after each status line."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def binned_means(stats: Mapping[str, float], name: str, bins: int = 4) -> list[float | None]:
    """``[stats[name_q0], ..., stats[name_q{bins-1}]]`` with None for bins absent in ``stats``."""
    return [stats.get(f"{name}_q{k}") for k in range(bins)]


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def status_line(
    *,
    tick: int,
    kimg: float,
    sec_per_kimg: float,
    img_per_sec: float,
    peak_mem_gb: float | None = None,
    losses: Mapping[str, Sequence[float | None]] | None = None,
    mfu: float | None = None,
    step: int | None = None,
    total_sec: float | None = None,
    sec_per_tick: float | None = None,
    maintenance_sec: float | None = None,
) -> str:
    """One-line tick summary (docs/method.md §5.4 item 1), e.g.::

        tick 12  step 1200  kimg 2457.6  time 1h02m  sec/tick 310.2  sec/kimg 1.51  img/s 660.1
        mfu 41.3%  maint 2.1  mem 61.25GB  terminal 0.012/0.008/0.005/0.003  fm 0.41/0.33/0.29/0.27

    ``losses`` maps a short name to its per-t-bin means (``binned_means``: bins q0..q3 of the
    sample's time t, q0 = t < 0.25, ..., q3 = t ≥ 0.75, ``tvm.runtime.stats.time_bins``; "-" for a bin
    without samples); ``mfu`` is a fraction.
    Optional fields are omitted when None.
    """
    parts = [f"tick {tick}"]
    if step is not None:
        parts.append(f"step {step}")
    parts.append(f"kimg {kimg:.1f}")
    if total_sec is not None:
        parts.append(f"time {format_duration(total_sec)}")
    if sec_per_tick is not None:
        parts.append(f"sec/tick {sec_per_tick:.1f}")
    parts += [f"sec/kimg {sec_per_kimg:.3f}", f"img/s {img_per_sec:.1f}"]
    if mfu is not None:
        parts.append(f"mfu {100 * mfu:.1f}%")
    if maintenance_sec is not None:
        parts.append(f"maint {maintenance_sec:.1f}")
    if peak_mem_gb is not None:
        parts.append(f"mem {peak_mem_gb:.2f}GB")
    for name, values in (losses or {}).items():
        parts.append(f"{name} " + "/".join(_fmt(v, ".4g") for v in values))
    return "  ".join(parts)


# ---------------------------------------------------------------------------------------------
# The run logger
# ---------------------------------------------------------------------------------------------


def _resolve_wandb_mode(mode: str) -> str:
    """Downgrade "online" without ``WANDB_API_KEY`` to "disabled", with a warning."""
    if mode == "online" and not os.environ.get(API_KEY_ENV):
        warnings.warn(
            f"wandb mode 'online' requested but {API_KEY_ENV} is not set in the environment; wandb is disabled "
            f"for this run (export {API_KEY_ENV}, or use mode 'offline' and `wandb sync` later)",
            RuntimeWarning,
            stacklevel=3,
        )
        return "disabled"
    return mode


def _import_wandb() -> ModuleType | None:
    try:
        import wandb
    except ImportError:
        warnings.warn(
            "wandb is not installed (pip install 'tvm-train[wandb]'); wandb logging is disabled",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    return wandb


class RunLogger:
    """Per-run logging; every method is a no-op on ranks other than 0 (so callers need no gate).

    Construct on every rank with the same arguments; only rank 0 creates files or a wandb run.
    """

    def __init__(
        self,
        run_dir: str | os.PathLike[str],
        rank: int,
        wandb_mode: str = "disabled",
        project: str | None = None,
        entity: str | None = None,
        run_name: str | None = None,
        config_dict: Mapping[str, Any] | None = None,
        curves: bool = True,
    ) -> None:
        if wandb_mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {wandb_mode!r}")
        self.run_dir = Path(run_dir)
        self.rank = rank
        self._wandb: ModuleType | None = None
        self._wandb_run: Any = None
        self._bar: tqdm | LineProgress | None = None
        self._log_file = None
        self._stats_file = None
        self._curves = curves and rank == 0  # redraw training_curves.png after each stats record
        if rank != 0:
            self.wandb_mode = "disabled"
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._log_file = open(self.run_dir / "log.txt", "a", encoding="utf-8")
        self._stats_file = open(self.run_dir / "stats.jsonl", "a", encoding="utf-8")
        self.wandb_mode = _resolve_wandb_mode(wandb_mode)
        if self.wandb_mode != "disabled":
            self._start_wandb(project, entity, run_name, config_dict)

    def _start_wandb(
        self, project: str | None, entity: str | None, run_name: str | None, config_dict: Mapping[str, Any] | None
    ) -> None:
        """Create the wandb run (resumable by run-directory name); the key comes from the env only."""
        self._wandb = _import_wandb()
        if self._wandb is None:
            self.wandb_mode = "disabled"
            return
        self._wandb_run = self._wandb.init(
            project=project,
            entity=entity,
            name=run_name,
            config=sanitize_config(dict(config_dict or {})),
            dir=str(self.run_dir),
            mode=self.wandb_mode,
            id=self._wandb_run_id(),
            resume="allow",
        )

    def _wandb_run_id(self) -> str:
        """Random wandb run id stored in the run directory, so a requeued job continues the same
        wandb run instead of starting a new one (and two runs never share an id)."""
        id_file = self.run_dir / "wandb_run_id.txt"
        if id_file.is_file():
            return id_file.read_text(encoding="utf-8").strip()
        run_id = uuid.uuid4().hex[:16]
        id_file.write_text(run_id + "\n", encoding="utf-8")
        return run_id

    @property
    def is_main(self) -> bool:
        """True on rank 0, the rank that writes."""
        return self.rank == 0

    def log(self, message: str) -> None:
        """Print ``message`` (above the progress bar) and append it to ``log.txt``; rank 0 only."""
        if self._log_file is None:
            return
        message = _scrub(message)
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)
        self._log_file.write(message + "\n")
        self._log_file.flush()

    def log_stats(self, stats: Mapping[str, float], step: int, **extra: Any) -> None:
        """Append ``{"step", "time", **extra, **stats}`` as one line of ``stats.jsonl`` and send
        ``{**extra, **stats}`` to wandb at ``step``. Non-finite floats are written as null (valid
        JSON); secret-looking keys and the API key's value are removed (``sanitize_config``)."""
        if self._stats_file is None:
            return
        values = sanitize_config({**extra, **stats})
        record = {"step": step, "time": time.time(), **values}
        clean = {key: (None if isinstance(v, float) and not math.isfinite(v) else v) for key, v in record.items()}
        self._stats_file.write(_scrub(json.dumps(clean)) + "\n")
        self._stats_file.flush()
        self._plot_curves()
        if self._wandb_run is not None:
            self._wandb_run.log(values, step=step)

    def _plot_curves(self) -> None:
        """Redraw ``training_curves.png`` from ``stats.jsonl``. A picture must never stop a run: a
        failure is reported once as a warning and plotting is switched off for this logger."""
        if not self._curves:
            return
        try:
            plot_training_curves(self.run_dir / "stats.jsonl", self.run_dir / CURVES_FILE)
        except Exception as exc:  # noqa: BLE001 - any failure only costs the picture
            self._curves = False
            warnings.warn(
                f"could not draw {self.run_dir / CURVES_FILE}: {exc}; no more curves for this run",
                RuntimeWarning,
                stacklevel=3,
            )

    def log_images(self, name: str, path: str | os.PathLike[str], step: int, caption: str | None = None) -> None:
        """Send an image file to wandb as ``name`` at ``step`` (no-op when wandb is off)."""
        if self._wandb_run is None or self._wandb is None:  # both or neither
            return
        image = self._wandb.Image(str(path), caption=None if caption is None else _scrub(caption))
        self._wandb_run.log({name: image}, step=step)

    def progress(self, total: int, initial: int = 0) -> tqdm | LineProgress:
        """Progress over steps on rank 0 (disabled elsewhere); ``log`` prints above it. A tqdm bar
        when stderr is a terminal; otherwise a plain line every ``PLAIN_PROGRESS_SECONDS``."""
        if self._bar is not None:
            self._bar.close()
        self._bar = progress_bar(
            total=total,
            initial=initial,
            desc="train",
            unit="step",
            disable=not self.is_main,
            interval=PLAIN_PROGRESS_SECONDS,
        )
        return self._bar

    def close(self) -> None:
        """Finish wandb and close files and the bar (idempotent)."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None
        for handle in (self._log_file, self._stats_file):
            if handle is not None:
                handle.close()
        self._log_file = self._stats_file = None

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
