"""Fixtures shared by the evaluation tests."""

from __future__ import annotations

import pytest

from helpers import single_thread

one_thread = pytest.fixture(autouse=True, scope="module", name="one_thread")(single_thread)
