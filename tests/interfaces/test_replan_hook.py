"""The re-plan hook hetero.compile hands the Ray executor: constraints that name a device
lost for good lapse (a pinned device gone used to leave the deployment failed for good)."""

from __future__ import annotations

from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.api import CompileSettings, _Builder
from hetero.interfaces.models import mlp_block
from hetero.partitioner.decisions import BackendAssignment, Objective
from hetero.partitioner.graph import capture

CPU = {"kind": "cpu", "cores": 1, "bandwidth": "20 GB/s", "memory": "4 GB"}
SPEC = {
    "name": "two",
    "hosts": [
        {"name": "a", "devices": [{"name": "cpu", **CPU}]},
        {"name": "b", "devices": [{"name": "cpu", **CPU}]},
    ],
    "network": {"bandwidth": "1 GB/s", "latency": "100 us"},
}


def test_pins_and_exclusions_of_lost_devices_lapse_on_replan(tmp_path):
    model, x = mlp_block(batch=2, seq=4)
    graph = capture(model, x)
    spec = ClusterSpec.from_dict(SPEC)
    eager = BackendAssignment.parse({"cpu": "eager"})
    pinned = CompileSettings(Objective.LATENCY, eager, pins={"fc2": "b/cpu"}, cache_dir=tmp_path)
    build = _Builder(graph, pinned, x, default_registry())
    _, plan = build(spec)
    assert "b/cpu" in {p.device for p in plan.partitions}
    stages, plan = build(spec.without(["b/cpu"]))  # b is gone for good
    assert {p.device for p in plan.partitions} == {"a/cpu"} and stages

    excluded = CompileSettings(Objective.LATENCY, eager, exclude=("b/cpu",), cache_dir=tmp_path)
    excluding = _Builder(graph, excluded, x, default_registry())
    _, plan = excluding(spec)
    assert {p.device for p in plan.partitions} == {"a/cpu"}
    _, plan = excluding(spec.without(["b/cpu"]))
    assert {p.device for p in plan.partitions} == {"a/cpu"}
