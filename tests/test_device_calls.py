"""bench/device_calls.sh, the GPU rows as device calls: every part it names runs only commands that parse, so that a
lent machine's few minutes are not spent on a typo. The parts run here with ``python3`` and ``torchrun`` replaced by
a recorder; each recorded ``bench/step.py`` command line then goes through that script's own checks (``--dry-run``:
every variant parses, before any GPU work), each pytest run names test files that exist, and each other script
exists."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "device_calls.sh"


def usage_parts() -> list[str]:
    """The parts of the script's usage line (what it tells a caller it takes)."""
    usage = re.search(r"usage: bash bench/device_calls.sh ([\w|-]+)", SCRIPT.read_text())
    assert usage, "no usage line"
    return usage.group(1).split("|")


def test_the_usage_line_the_header_and_the_case_labels_name_the_same_parts():
    text = SCRIPT.read_text()
    header = " ".join(line.lstrip("# ") for line in text.split("case ")[0].splitlines() if line.startswith("#"))
    listed = re.search(r"PART: ([\w |-]+?)\s*Run from", header)
    assert listed, "no PART list in the header"
    labels = re.findall(r"^([\w-]+)\)", text.split("\ncase ")[1], flags=re.M)
    assert sorted(usage_parts()) == sorted(p.strip() for p in listed.group(1).split("|")) == sorted(labels)


def recorded_commands(part: str, tmp_path: Path) -> list[list[str]]:
    """The command lines ``bash bench/device_calls.sh PART`` runs through ``python3`` and ``torchrun``."""
    bin_dir, record = tmp_path / "bin", tmp_path / f"{part}.jsonl"
    bin_dir.mkdir(exist_ok=True)
    for name in ("python3", "torchrun"):
        fake = bin_dir / name
        fake.write_text(
            f"#!{sys.executable}\nimport json, os, sys\n"
            f"open(os.environ['RECORD'], 'a').write(json.dumps([{name!r}, *sys.argv[1:]]) + '\\n')\n"
        )
        fake.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RECORD": str(record), "OUT": str(tmp_path)}
    env["BUDGET_FULL"] = "0.5"  # the one part that takes a setting
    proc = subprocess.run(["bash", str(SCRIPT), part], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"part {part}: {proc.stderr[-2000:]}"
    return [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []


def test_every_part_runs_commands_that_parse(tmp_path, monkeypatch, capsys):
    from bench.step import main as step_main

    for part in usage_parts():
        commands = recorded_commands(part, tmp_path)
        assert commands, f"part {part} runs nothing"
        for command in commands:
            program, *args = command
            if args[0] == "-c":  # the check for the wheels of .whl/ (where that folder exists)
                continue
            if args[:2] == ["-m", "pytest"]:
                tests = [a for a in args[2:] if a.startswith("tests/")]
                assert tests and all((ROOT / t.split("::")[0]).is_file() for t in tests), (part, command)
            elif args[0] == "bench/step.py":
                monkeypatch.setattr(sys, "argv", ["step.py", *args[1:], "--dry-run"])
                step_main()  # SystemExit with the reason for a command that would fail before its first row
                assert "all parse" in capsys.readouterr().out, (part, command)
            else:
                script = next((a for a in args if a.endswith(".py")), None)
                assert script and (ROOT / script).is_file(), (part, command)


def test_an_unknown_part_is_refused(tmp_path):
    with pytest.raises(AssertionError, match="unknown part nonsense"):
        recorded_commands("nonsense", tmp_path)
