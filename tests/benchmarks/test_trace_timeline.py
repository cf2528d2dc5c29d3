"""benchmarks/trace_timeline.py on a hand-made trace: the link is the host->device copies,
and its idle gaps start where everything copied so far has ended."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "trace_timeline.py"


def _timeline():
    spec = importlib.util.spec_from_file_location("trace_timeline", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.timeline


def _copy(name: str, ts_ms: float, dur_ms: float, nbytes: int) -> dict:
    return {"ph": "X", "cat": "gpu_memcpy", "name": f"Memcpy {name}", "ts": ts_ms * 1e3,
            "dur": dur_ms * 1e3, "args": {"bytes": nbytes}}  # fmt: skip


def _stage(name: str, ts_ms: float, dur_ms: float) -> dict:
    return {"ph": "X", "cat": "user_annotation", "name": f"stage {name}", "ts": ts_ms * 1e3,
            "dur": dur_ms * 1e3}  # fmt: skip


def test_gaps_start_after_the_longest_copy_and_ignore_device_to_host(tmp_path):
    events = [
        _copy("HtoD (Pinned -> Device)", 0.0, 8.0, 400),  # a layer's weights
        _copy("HtoD (Pinned -> Device)", 1.0, 0.01, 8),  # an activation, inside it
        _copy("DtoH (Device -> Pinned)", 3.0, 0.01, 8),  # a GPU output for the CPU
        _copy("HtoD (Pinned -> Device)", 8.5, 8.0, 400),  # 0.5 ms after the first ended
        _copy("HtoD (Pinned -> Device)", 20.0, 8.0, 400),  # 3.5 ms after
        _stage("decode:p3.0 streamed", 19.5, 1.0),  # whose start freed a slot
    ]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": events}))
    got = _timeline()(str(path), gap_ms=0.4)
    assert [g["idle_ms"] for g in got["link_idle_gaps"]] == [0.5, 3.5]
    assert got["link_idle_gaps"][1]["until"] == "stage decode:p3.0 streamed"
    assert got["link_bytes"] == 400 + 8 + 400 + 400  # the DtoH copy is not the link's
    assert got["link_busy_ms"] == 24.0
