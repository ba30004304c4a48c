"""``python train.py --help``: the main knobs with their units, generated from the config schema.

Hydra's own ``--help`` lists the whole composed config without a word about units. Here the
descriptions are the schema's field comments in ``tvm/config.py`` (read from its source with
``ast`` and ``tokenize``, so the schema stays the one place that documents a knob), the values are
those of the chosen config (``--config-name``, command-line overrides applied), and the choice and
grouping of the main knobs is :data:`MAIN_KNOBS`. ``--hydra-help`` still gives Hydra's help.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import textwrap
import tokenize
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from tvm import config as config_module

HELP_FLAGS = ("--help", "-h")

# (group title, keys): the knobs a user sets first; every key must exist in the schema (tested).
MAIN_KNOBS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("data", ("dataset.path", "dataset.use_labels", "dataset.xflip", "encoder.vae_name", "dataloader.num_workers")),
    (
        "length and batch",
        (
            "training.total_ticks",
            "training.kimg_per_tick",
            "training.batch_size",
            "training.batch_gpu",
            "training.max_steps",
        ),
    ),
    (
        "method and optimiser",
        ("loss.cfg", "optimizer.lr", "training.ema_beta", "training.ema_target_beta", "training.max_grad_norm"),
    ),
    (
        "model and speed",
        ("network.model_type", "network.data_type", "network.compile", "network.compile_memory_budget"),
    ),
    (
        "run directory, checkpoints, pictures",
        (
            "run_dir",
            "training.ckpt_ticks",
            "training.keep_last",
            "training.snapshot_ticks",
            "training.sample_ticks",
            "training.resume",
            "training.transfer",
            "logger.mode",
        ),
    ),
    (
        "evaluation",
        (
            "training.metrics",
            "training.eval_ticks",
            "training.no_eval_before_tick",
            "eval.ref_stats",
            "eval.detector_url",
            "eval.num_images",
        ),
    ),
)

WIDTH = 120
KEY_COLUMN = 34
VALUE_COLUMN = 20


def _field_comments(source: str) -> dict[str, dict[str, str]]:
    """``{class name: {field: comment}}`` for the annotated fields of every class in ``source``;
    a field's comment is the text of the ``#`` comments on its lines (a field may span lines)."""
    comments: dict[int, str] = {}
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.string.lstrip("#").strip()
    result: dict[str, dict[str, str]] = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = result.setdefault(node.name, {})
        for statement in node.body:
            if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
                lines = range(statement.lineno, (statement.end_lineno or statement.lineno) + 1)
                fields[statement.target.id] = " ".join(comments[n] for n in lines if n in comments)
    return result


def schema_descriptions() -> dict[str, str]:
    """``{"training.batch_size": "global batch (images per optimizer step)", ...}`` for every key
    of the schema (``tvm.config.Config``), from the field comments ("" where a field has none)."""
    comments = _field_comments(inspect.getsource(config_module))
    out: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            nested = getattr(config_module, str(f.type), None)
            if isinstance(nested, type) and dataclasses.is_dataclass(nested):
                walk(nested, f"{prefix}{f.name}.")
            else:
                out[prefix + f.name] = comments.get(cls.__name__, {}).get(f.name, "")

    walk(config_module.Config, "")
    return out


def _config_name(argv: Sequence[str], default: str) -> str:
    """The value of ``--config-name=X``, ``--config-name X`` or ``-cn X`` in ``argv`` (else ``default``)."""
    for i, arg in enumerate(argv):
        for flag in ("--config-name", "-cn"):
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
            if arg == flag and i + 1 < len(argv):
                return argv[i + 1]
    return default


def _show(value: Any, width: int) -> str:
    """A value as typed on the command line (null, true, [a, b]), cut to ``width`` characters."""
    if value is None:
        text = "null"
    elif isinstance(value, bool):
        text = str(value).lower()
    elif OmegaConf.is_list(value) or isinstance(value, (list, tuple)):
        text = "[" + ", ".join(_show(v, 10**6) for v in value) + "]"
    else:
        text = str(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def help_text(argv: Sequence[str], default_config: str = "tiny", program: str = "train.py") -> str:
    """The help page for ``program`` given its command line (config name and overrides)."""
    name = _config_name(argv, default_config).removesuffix(".yaml")
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    descriptions = schema_descriptions()
    try:
        source = config_module.compose_config(name, overrides)
        note = f"value in config '{name}'" + (" with the overrides" if overrides else "")
    except Exception as exc:  # noqa: BLE001 - a bad config still gets a help page, with the reason
        source, note = OmegaConf.structured(config_module.Config), f"schema default ('{name}' failed: {exc})"
    configs = sorted(p.stem for p in config_module.CONFIG_DIR.glob("*.yaml"))
    lines = [
        f"{program}: train a TVM (Terminal Velocity Matching) model.",
        "",
        f"usage: python {program} [--config-name=NAME] [key=value ...]         one process",
        "       bash train.sh NUM_GPUS NAME [key=value ...]                    torchrun, one process per GPU",
        "",
        f"configs (configs/): {', '.join(configs)}; default: {default_config}",
        "units: a step (iteration) is one optimizer update on batch_size images; a tick is kimg_per_tick",
        "  thousand images (kimg_per_tick·1000/batch_size steps); everything periodic (checkpoints, samples,",
        "  metrics, the status line) is counted in ticks. Key names below are relative to the config root.",
        "",
        f"main knobs ({note}):",
    ]
    indent = " " * (2 + KEY_COLUMN + VALUE_COLUMN)
    for title, keys in MAIN_KNOBS:
        lines.append(f"  {title}:")
        for key in keys:
            value = _show(OmegaConf.select(source, key), WIDTH - 2 - KEY_COLUMN)
            text = textwrap.wrap(descriptions.get(key, ""), WIDTH - len(indent)) or [""]
            if len(value) <= VALUE_COLUMN - 2:
                lines.append(f"    {key:<{KEY_COLUMN - 2}}{value:<{VALUE_COLUMN}}{text[0]}")
                text = text[1:]
            else:  # a long value (a path, a URL) takes its own line, the description follows below
                lines.append(f"    {key:<{KEY_COLUMN - 2}}{value}")
            lines += [indent + more for more in text]
    lines += [
        "",
        "every key, with its unit and default: tvm/config.py; the composed config: "
        f"python {program} --config-name=NAME --cfg job",
        "Hydra's own help: --hydra-help",
    ]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def print_help_if_asked(argv: Sequence[str], default_config: str = "tiny", program: str = "train.py") -> bool:
    """Print :func:`help_text` and return True when ``argv`` holds ``--help`` or ``-h``."""
    if not any(arg in HELP_FLAGS for arg in argv):
        return False
    print(help_text([a for a in argv if a not in HELP_FLAGS], default_config, program), end="")
    return True
