"""Helpers of the runtime tests (a module of its own: `conftest` is ambiguous to import
when several test folders have one)."""

from __future__ import annotations

from hetero.backends.registry import default_registry
from hetero.partitioner.split import split
from hetero.runtime.build import compile_partitions

CLUSTER = {
    "name": "two-hosts",
    "hosts": [
        {
            "name": "head",
            "devices": [
                {"name": "cpu", "kind": "cpu", "cores": 1, "bandwidth": "20 GB/s", "memory": "4 GB"}
            ],
        },
        {
            "name": "edge",
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "cores": 1,
                    "bandwidth": "20 GB/s",
                    "memory": "4 GB",
                },
                {"name": "npu", "kind": "npu", "bandwidth": "50 GB/s", "memory": "2 GB"},
            ],
            "links": [{"between": ["cpu", "npu"], "bandwidth": "8 GB/s"}],
        },
    ],
    "network": {"bandwidth": "1 GB/s", "latency": "100 us"},
}


def thirds(graph) -> dict[str, int]:
    """The graph's ops cut into three contiguous partitions."""
    n = len(graph.order)
    return {name: min(2, 3 * i // n) for i, name in enumerate(graph.order)}


def make_stages(graph, cluster, devices, cache_dir, backend="eager", registry=None):
    """Stages of `graph` cut in thirds, partition i on `devices[i]` (device names)."""
    parts = split(graph, thirds(graph))
    placements = [(cluster.device(d), backend) for d in devices]
    registry = registry if registry is not None else default_registry()
    return compile_partitions(graph, parts, placements, cache_dir, registry=registry)
