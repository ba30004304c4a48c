"""The package's layers point down only (README "Architecture"): a package imports from itself,
the top-level helper modules and the layers below it, never from a layer above (no cycles)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "tvm"
ORDER = ["models", "data", "method", "runtime", "compat", "eval", "train"]  # each may import earlier ones
BELOW = {"models": set(), "data": set()}  # models and data are independent leaves
HELPERS = {"config", "compiling", "progress", "cli_help"}  # top-level modules any layer may use
IMPORT = re.compile(r"^\s*(?:from|import)\s+tvm\.([a-z_]+)", re.M)


def imported_layers(package: str) -> set[str]:
    found = set()
    for path in (ROOT / package).rglob("*.py"):
        found |= set(IMPORT.findall(path.read_text()))
    return found - {package} - HELPERS


def test_every_package_imports_only_layers_below_it():
    for index, package in enumerate(ORDER):
        allowed = BELOW.get(package, set(ORDER[:index]))
        upward = imported_layers(package) - allowed
        assert not upward, f"tvm/{package} imports {sorted(upward)}, which sit above it (allowed: {sorted(allowed)})"


def test_the_scan_sees_imports():
    assert "runtime" in imported_layers("train") and "method" in imported_layers("runtime")
