"""benchmarks/export_overhead_cpu.py at a tiny width: hetero's captured ConvNeXt program
dispatches the module's compute ops (the same ops, shapes and order), so a capture change
that adds copies or changes layouts shows here."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "export_overhead_cpu.py"


@pytest.mark.slow
def test_the_captured_program_does_the_modules_compute():
    spec = importlib.util.spec_from_file_location("export_overhead_cpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    r = module.compare(width=8, batch=1, hw=64, rounds=1, calls=1)
    assert r["same_compute"], (r["module_compute"], r["program_compute"])
    assert r["module_compute"]["aten::addmm"] == 37  # every Linear, in both
