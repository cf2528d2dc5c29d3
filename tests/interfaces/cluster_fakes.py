"""Fakes for the interface tests: a CompiledModel stand-in and a scriptable servable."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch
import yaml

from hetero.partitioner.graph import TensorMeta, capture


class EagerCompiled:
    """Stands in for hetero.interfaces.api.CompiledModel: the contract's surface, run eagerly."""

    def __init__(self, model: torch.nn.Module, example_inputs: tuple) -> None:
        self.model = model.eval()
        self.graph = capture(model, example_inputs)
        self.input_names = list(self.graph.inputs)
        self.output_names = list(self.graph.outputs)
        self.plan = None
        self.closed = False

    def __call__(self, *inputs):
        with torch.no_grad():
            return self.model(*inputs)

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = self(*[inputs[n] for n in self.input_names])
        outs = out if isinstance(out, tuple | list) else (out,)
        return dict(zip(self.output_names, outs, strict=True))

    def ready(self) -> bool:
        return not self.closed

    def shutdown(self) -> None:
        self.closed = True


class FakeServable:
    """y = 2x + sum(ids); optionally slow, gated, or not ready."""

    input_metas = {
        "x": TensorMeta(("s0", 8), (2, 8), "float32"),
        "ids": TensorMeta((4,), (4,), "int64"),
    }
    output_metas = {"y": TensorMeta(("s0", 8), (2, 8), "float32")}

    def __init__(self, delay: float = 0.0, gate: threading.Event | None = None) -> None:
        self.delay = delay
        self.gate = gate
        self.is_ready = True
        self.calls = 0
        self.shut = False

    def run_flat(self, inputs):
        self.calls += 1
        if self.gate is not None:
            self.gate.wait(30)
        if self.delay:
            time.sleep(self.delay)
        return {"y": inputs["x"] * 2 + inputs["ids"].sum()}

    def ready(self) -> bool:
        return self.is_ready

    def info(self):
        return {
            "model": "fake",
            "state": "ready",
            "plan_summary": "one partition",
            "partitions": [],
        }

    def shutdown(self) -> None:
        self.shut = True


def write_config(directory, name: str = "deploy.yaml", **overrides) -> Path:
    """A small real deploy config: the bundled MLP block on the 2-core cluster, eager backend."""
    root = Path(__file__).resolve().parents[2]
    data = {
        "model": "hetero.interfaces.models:mlp_block",
        "model_args": {"batch": 2, "seq": 4},
        "cluster": str(root / "configs" / "clusters" / "cpu-2core.yaml"),
        "backends": {"cpu": "eager"},
        "cache_dir": str(Path(directory) / "cache"),
        "serving": {"port": 0},
    }
    data.update(overrides)
    path = Path(directory) / name
    path.write_text(yaml.safe_dump(data))
    return path
