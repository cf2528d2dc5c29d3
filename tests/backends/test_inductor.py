"""The inductor backend on the CPU: compile a partition, load it, match eager."""

from __future__ import annotations

import pytest
import torch

from hetero.backends.base import Artifact, CompileOptions, CompileUnit
from hetero.backends.inductor import InductorBackend
from hetero.backends.registry import default_registry
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError
from hetero.partitioner.graph import capture
from hetero.partitioner.split import flatten_inputs, param_values, split

CPU = DeviceSpec("test/cpu0", "cpu", "test", cores=2)


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.ln = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.ln(torch.nn.functional.gelu(self.lin(x)) + x)


def unit_of(model, x) -> CompileUnit:
    graph = capture(model.eval(), (x,))
    (part,) = split(graph, {n: 0 for n in graph.order})
    return CompileUnit.from_partition(part, flatten_inputs(graph, (x,)), param_values(graph))


def test_registry_builds_it():
    b = default_registry().get("inductor")
    assert isinstance(b, InductorBackend) and set(b.device_kinds) == {"cpu", "gpu"}


@pytest.mark.slow
def test_cpu_partition_matches_eager(tmp_path):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 16)
    backend = InductorBackend()
    man = backend.compile(unit_of(model, x), CPU, CompileOptions(), tmp_path)
    assert set(man.files) == {"program.pt2", "inductor.json"}
    run = backend.load(Artifact("inductor", "k", tmp_path, {}), CPU)
    (got,) = run(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_unknown_mode_is_refused(tmp_path):
    model, x = Block(), torch.randn(3, 16)
    with pytest.raises(CompileError, match="reduce-overhead"):
        InductorBackend().compile(
            unit_of(model, x), CPU, CompileOptions(extra=(("mode", "fastest"),)), tmp_path
        )
