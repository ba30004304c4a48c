"""How ``train.py`` ends: one clear last line for whatever stopped the run.

A failed run used to end in 30–100 lines of Hydra's and Python's tracebacks (and, under torchrun,
one more traceback per worker and torchrun's own report), with the cause somewhere above.
:func:`run_entry_point` runs the Hydra ``main`` and makes ``train.py: error: <cause>`` the last
line on stderr:

* configuration and input errors (unknown key, bad value, missing dataset, unreadable checkpoint,
  full disk, batch not divisible by the world size, …) print that line only, without a traceback;
* anything else (a bug) prints its traceback first, then the line;
* ``HYDRA_FULL_ERROR=1`` keeps Python's full traceback for everything, as Hydra documents;
* a Ctrl-C that aborts the run (during set-up, or the second one) prints ``train.py: interrupted``
  and exits with 130; a first Ctrl-C in the loop stops it with a checkpoint (exit 0).

Under ``train.sh`` every worker also writes its line to ``$TVM_ERROR_DIR/rank<RANK>.txt``, and
train.sh repeats the lowest rank's line after torchrun's report, so the cause ends the output there too.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

from tvm.runtime.checkpoint import CheckpointError
from tvm.train.update import NonFiniteLossError

ERROR_DIR_ENV = "TVM_ERROR_DIR"  # set by train.sh: where each worker writes its one-line cause
INTERRUPTED_EXIT = 130  # the shell's code for a process stopped by SIGINT
# Errors that describe the user's input or machine, not a bug: their message is the whole story.
USER_ERRORS = (
    HydraException,
    OmegaConfBaseException,
    CheckpointError,
    NonFiniteLossError,
    ValueError,
    OSError,
    ImportError,
)


def one_line(error: BaseException) -> str:
    """The cause of ``error`` on one line. Hydra's composition errors keep the first line of their
    message and of their cause (``Could not override 'training.bogus': Key 'bogus' not in 'TrainingConfig'``);
    other messages are joined onto one line whole. Unexpected errors are prefixed with their type."""
    if isinstance(error, (HydraException, OmegaConfBaseException)):
        parts = [_first_line(e) for e in (error, error.__cause__) if e is not None and str(e).strip()]
        return ": ".join(parts) or type(error).__name__
    text = " ".join(str(error).split())
    if isinstance(error, USER_ERRORS) and text:
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _first_line(error: BaseException) -> str:
    """The first line of a message; where it is a header ending in ``:`` (a bad value in a config
    file: ``In 'exp': ValidationError raised while composing config:``), with the detail below it
    and the key (``Invalid value 'x', expected one of [a, b] (key network.jvp_mode)``)."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    first = lines[0].rstrip(".:")
    if lines[0].endswith(":") and len(lines) > 1:
        keys = [line.split(":", 1)[1].strip() for line in lines[2:] if line.startswith("full_key:")]
        first += f": {lines[1]}" + (f" (key {keys[0]})" if keys else "")
    return first


def report_error(prog: str, message: str) -> None:
    """``<prog>: <message>`` as the last line on stderr, and into ``$TVM_ERROR_DIR`` for train.sh."""
    line = f"{prog}: {message}"
    sys.stdout.flush()
    print(line, file=sys.stderr, flush=True)
    folder = os.environ.get(ERROR_DIR_ENV)
    if folder:
        try:
            Path(folder, f"rank{int(os.environ.get('RANK', '0')):05d}.txt").write_text(line + "\n")
        except (OSError, ValueError):
            pass  # the line is on stderr already


def outcome_line(prog: str, result: dict[str, Any]) -> str | None:
    """What to say last after a run that stopped early on a signal (None otherwise)."""
    if not result.get("preempted"):
        return None
    step = result.get("progress", {}).get("step")
    return (
        f"{prog}: stopped at step {step} on {result.get('signal') or 'a stop request'} with a checkpoint in "
        f"{result.get('run_dir')}; run the same command to continue"
    )


def run_entry_point(main: Callable[[], Any], prog: str) -> int:
    """Run ``main`` (a ``@hydra.main`` function); returns the process exit code (see the module doc)."""
    full_tracebacks = os.environ.get("HYDRA_FULL_ERROR") == "1"
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra re-raises composition errors, which are reported here
    try:
        main()
    except KeyboardInterrupt:
        report_error(
            prog,
            "interrupted: stopped at once, without writing a checkpoint; the same command "
            "continues from the latest checkpoint of the run directory (if any)",
        )
        return INTERRUPTED_EXIT
    except Exception as error:  # noqa: BLE001 - reported in one line below, with the traceback if it is a bug
        if full_tracebacks:
            raise
        if not isinstance(error, USER_ERRORS):
            traceback.print_exc()
        report_error(prog, f"error: {one_line(error)}")
        return 1
    return 0
