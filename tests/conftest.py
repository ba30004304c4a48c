"""Test-wide settings.

TRITON_INTERPRET must be set before any Triton kernel is defined (i.e. before `kernels` is
imported), so that the Triton kernels run on the CPU interpreter in CI.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "2")

import torch  # noqa: E402

torch.set_num_threads(2)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))  # makes tests/helpers.py importable as `helpers`
