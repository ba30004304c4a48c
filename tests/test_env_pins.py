"""env.yml (GPU nodes) pins the torch/triton of the GPU benchmarks and otherwise what constraints.txt pins."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _pins(text: str) -> dict[str, str]:
    return {name.lower(): version for name, version in re.findall(r"^[\s-]*([A-Za-z0-9_.\-]+)==(\S+)", text, re.M)}


def test_env_yml_pins_the_benchmarked_gpu_stack_and_otherwise_the_ci_versions() -> None:
    env = _pins((ROOT / "env.yml").read_text())
    ci = _pins((ROOT / "constraints.txt").read_text())
    benchmarks = (ROOT / "docs" / "benchmarks.md").read_text()
    measured = set(re.findall(r"torch (\d+\.\d+\.\d+\+cu\d+);\s+triton (\d+\.\d+\.\d+)", benchmarks))
    assert measured == {(env["torch"], env["triton"])}, f"benchmarks used {measured}, env.yml pins {env}"
    assert set(env) - {"torch", "triton"} <= set(ci)
    assert {name: v for name, v in env.items() if name not in ("torch", "triton")} == {
        name: ci[name] for name in env if name not in ("torch", "triton")
    }
