"""benchmarks/backend_suite_gpu.py without compiling anything: the time budget, the JSON it
leaves, and its table's ratios (the models run on the GPU machine, or with --tiny by hand)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "backend_suite_gpu.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("backend_suite_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_rows_past_the_budget_are_recorded_as_not_run(suite, tmp_path, capsys):
    out = tmp_path / "suite.json"
    suite.main(["--tiny", "--models", "gpt2,llama-decode", "--budget-s", "0", "--json", str(out)])
    saved = json.loads(out.read_text())
    assert [r["not_run"] for r in saved["rows"]] == ["not run (time)"] * 2
    assert "| gpt2 | 8x512 | not run (time) |" in capsys.readouterr().out


def test_table_gives_hetero_over_the_best_mode_and_lists_failures(suite):
    env = suite.Env(
        device="cpu", dtype=torch.float32, tiny=True, modes=("default", "reduce-overhead"),
        budget_s=1e9, choice_budget_s=None, hetero=True, json_path=None,
        results={"machine": {"card": "CPU"}, "rows": []},
    )  # fmt: skip
    fast = {"model": "gpt2", "issue_shape": "8x512", "shape": "8x512", "eager_ms": 5.0,
            "default": {"ms": 4.0, "err": 1e-3, "compile_s": 30.0},
            "reduce-overhead": {"ms": 2.5, "err": 1e-3, "compile_s": 40.0},
            "hetero": {"ms": 2.0, "err": 1e-3, "compile_s": 60.0, "partitions": [
                {"partition": 0, "device": "node0/gpu", "backend": "triton", "candidates": [
                    {"backend": "triton", "ms": 1.9, "note": ""},
                    {"backend": "inductor", "ms": 2.4, "note": ""}]}]}}  # fmt: skip
    failed = {"model": "bert", "issue_shape": "8x512", "shape": "8x512", "eager_ms": 5.0,
              "default": {"ms": 4.0, "err": 1e-3, "compile_s": 30.0},
              "reduce-overhead": "not run (time)", "hetero": {"error": "CaptureError: no"}}  # fmt: skip
    for row in (fast, failed):
        suite.summarize_row(env, row)
        env.results["rows"].append(row)
    assert fast["best_compile"] == "reduce-overhead" and fast["ratio"] == pytest.approx(0.8)
    assert fast["compile_time_ratio"] == pytest.approx(1.5)
    assert "ratio" not in failed
    table = suite.markdown(env)
    assert "| 2.000 | 0.80 | p0 node0/gpu: triton (triton 1.900, inductor 2.400) |" in table
    assert "geometric mean of hetero / best torch.compile: 0.800 over 1 model(s)" in table
    assert "| bert | 8x512 | 5.000 | 4.000 | not run (time) | failed | - |" in table
    assert "- bert / hetero: CaptureError: no" in table


def test_a_16_bit_model_is_also_measured_against_its_float32_self(suite):
    """float32_reference: the same 16-bit weights computed in float32, the model left in
    its dtype; nothing for a float32 model (eager is then the exact reference)."""
    import copy

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GELU()).to(torch.bfloat16)
    x = torch.randn(2, 8).to(torch.bfloat16)
    wide = copy.deepcopy(model).float()
    exact = suite.float32_reference(model, (x,))
    assert next(model.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        torch.testing.assert_close(exact, wide(x.float()), rtol=0, atol=0)
    assert suite.float32_reference(wide, (x.float(),)) is None
