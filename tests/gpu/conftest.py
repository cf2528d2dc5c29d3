"""What the GPU tests share: the Triton test models' folder on the path, and real kernels."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "backends" / "triton"))  # triton_models
sys.path.insert(0, str(Path(__file__).parents[1] / "backends"))  # block_units


@pytest.fixture(autouse=True)
def compiled_kernels(monkeypatch):
    # Other test modules turn the interpreter on at import; these tests need real kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "0")
