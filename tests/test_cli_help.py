"""``python train.py --help``: main knobs with units, from the schema's field comments (tvm/cli_help.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from omegaconf import OmegaConf

from tvm import cli_help
from tvm.config import compose_config

ROOT = Path(__file__).resolve().parents[1]


def _knob_line(text: str, key: str) -> str:
    lines = [line for line in text.splitlines() if line.startswith(f"    {key} ")]
    assert len(lines) == 1, f"{key} listed {len(lines)} times"
    return lines[0]


def test_train_help_lists_the_main_knobs_with_units() -> None:
    done = subprocess.run([sys.executable, "train.py", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    text = done.stdout
    assert "global batch (images per optimizer step)" in _knob_line(text, "training.batch_size")
    assert "length in ticks" in _knob_line(text, "training.total_ticks")
    assert "thousands of images per tick" in _knob_line(text, "training.kimg_per_tick")
    assert "per-GPU micro-batch (images)" in _knob_line(text, "training.batch_gpu")
    assert _knob_line(text, "training.batch_size").split()[1] == "64"  # the value in the default config, tiny
    assert "value in config 'tiny'" in text and "parameters" not in text  # help only: no training started


def test_values_follow_the_chosen_config_and_overrides() -> None:
    text = cli_help.help_text(["--config-name=im256_w2", "training.batch_gpu=32"])
    assert _knob_line(text, "training.batch_size").split()[1] == "2048"
    assert _knob_line(text, "training.batch_gpu").split()[1] == "32"
    assert _knob_line(text, "training.total_ticks").split()[1] == "3000"
    assert "value in config 'im256_w2' with the overrides" in text
    assert (
        _knob_line(cli_help.help_text(["-cn", "im512_w2p5"]), "eval.ref_stats").split()[1] == "dataset-refs/img512.pkl"
    )
    broken = cli_help.help_text(["--config-name=no_such_config"])  # still a help page, with the reason
    assert "schema default ('no_such_config' failed" in broken and _knob_line(broken, "training.batch_size")
    assert all(len(line) <= 120 for line in cli_help.help_text([]).splitlines() if "failed" not in line)


def test_every_main_knob_is_a_schema_key_with_a_description() -> None:
    descriptions = cli_help.schema_descriptions()
    keys = [key for _, group in cli_help.MAIN_KNOBS for key in group]
    assert len(keys) == len(set(keys))
    cfg = OmegaConf.to_container(compose_config("tiny"))
    for key in keys:
        assert key in descriptions, key
        assert descriptions[key], f"{key} has no comment in tvm/config.py"
    # every schema key is covered by the reader, including nested sections and multi-line fields
    assert descriptions["network.model_kwargs.qk_norm"] == "" and "network.model_kwargs.qk_norm" in descriptions
    assert descriptions["eval.detector_url"].startswith("FID/IS Inception")
    assert set(descriptions) >= {k for k in _leaf_keys(cfg) if not k.startswith("sampling.")}


def test_help_is_printed_only_when_asked(capsys) -> None:
    assert not cli_help.print_help_if_asked(["training.total_ticks=5"])
    assert capsys.readouterr().out == ""
    assert cli_help.print_help_if_asked(["-h"])
    assert "training.kimg_per_tick" in capsys.readouterr().out


def _leaf_keys(node: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items():
        keys += _leaf_keys(value, f"{prefix}{key}.") if isinstance(value, dict) else [prefix + key]
    return keys
