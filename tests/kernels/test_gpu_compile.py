"""The GPU compiler accepts every attention-JVP kernel variant (no GPU needed).

The other kernel tests run under the Triton interpreter, which accepts programs the GPU compiler
rejects. ``bench/kernel_resources.py`` compiles each variant the launchers use down to a cubin for an
H100 (sm_90) and an A100 (sm_80) with the ptxas of the Triton wheel; it runs in a subprocess without
``TRITON_INTERPRET``, since this process's kernels were defined for the interpreter.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VARIANTS_PER_DTYPE = 2 + 3 + 6 + 3  # forward ± tangent, pass Q, pass KV (two-pass and one-pass), δ kernel
SHARED_MEMORY_LIMIT = {"sm_90": 232448, "sm_80": 166912}  # bytes per block (opt-in maximum)


@pytest.mark.slow
def test_every_kernel_variant_compiles_for_hopper_and_ampere():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    command = [sys.executable, "bench/kernel_resources.py", "--targets", "90,80", "--dtypes", "bf16,fp32"]
    result = subprocess.run([*command, "--configs", "first"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) == 2 * 2 * VARIANTS_PER_DTYPE
    for target, dtype, kernel, flags, config, registers, spills, shared in (map(str.strip, r) for r in rows):
        assert 0 < int(registers) <= 255, (target, kernel, flags)
        assert int(shared) <= SHARED_MEMORY_LIMIT[target], (target, dtype, kernel, flags, config, shared)
        if kernel == "delta":  # a row reduction: nothing to spill
            assert re.fullmatch(r"0 / 0", spills), (target, dtype, flags, spills)
    assert "every variant compiled" in result.stdout
