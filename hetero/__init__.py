"""hetero: compile one PyTorch model for a cluster of GPUs, CPUs and NPUs.

graph = hetero.capture(model, example_inputs)
plan = hetero.plan(graph, hetero.Cluster.local())
cm = hetero.compile(model, example_inputs)
"""

from __future__ import annotations

import importlib
from typing import Any

from hetero.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec
from hetero.errors import (
    ArtifactCorrupt,
    CaptureError,
    CompileError,
    ConfigError,
    HeteroError,
    InvalidInput,
    PartitionError,
    PlanInfeasible,
    Unavailable,
    UnsupportedOpError,
    WorkerError,
)
from hetero.partitioner.graph import OpGraph, capture
from hetero.partitioner.plan import Plan

Cluster = ClusterSpec

# Heavier entry points load on first use, so `import hetero` stays cheap.
_LAZY = {
    "plan": "hetero.partitioner.algorithms:plan",
    "compile": "hetero.interfaces.api:compile",
    "deploy": "hetero.interfaces.api:deploy",
    "CompiledModel": "hetero.interfaces.api:CompiledModel",
}

__version__ = "0.1.0"

__all__ = [
    "ArtifactCorrupt",
    "CaptureError",
    "Cluster",
    "ClusterSpec",
    "CompileError",
    "CompiledModel",
    "ConfigError",
    "DeviceSpec",
    "HeteroError",
    "InvalidInput",
    "LinkSpec",
    "OpGraph",
    "PartitionError",
    "Plan",
    "PlanInfeasible",
    "Unavailable",
    "UnsupportedOpError",
    "WorkerError",
    "capture",
    "compile",
    "deploy",
    "plan",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        module, attr = _LAZY[name].split(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'hetero' has no attribute {name!r}")
