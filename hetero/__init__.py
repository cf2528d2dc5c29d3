"""hetero: compile one PyTorch model for a cluster of GPUs, CPUs and NPUs.

graph = hetero.capture(model, example_inputs)
plan = hetero.plan(graph, hetero.Cluster.local())
cm = hetero.compile(model, example_inputs)
"""

from __future__ import annotations

import importlib
from typing import Any

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

# Every public name loads on first use: `import hetero.cluster.spec` runs this file first,
# and the cluster description must import without torch (nor anything else above it).
_LAZY = {
    "Cluster": "hetero.cluster.spec:ClusterSpec",
    "ClusterSpec": "hetero.cluster.spec:ClusterSpec",
    "DeviceSpec": "hetero.cluster.spec:DeviceSpec",
    "LinkSpec": "hetero.cluster.spec:LinkSpec",
    "Objective": "hetero.partitioner.decisions:Objective",
    "BackendAssignment": "hetero.partitioner.decisions:BackendAssignment",
    "OpGraph": "hetero.partitioner.graph:OpGraph",
    "capture": "hetero.partitioner.graph:capture",
    "Plan": "hetero.partitioner.plan:Plan",
    "plan": "hetero.interfaces.api:plan",
    "compile": "hetero.interfaces.api:compile",
    "deploy": "hetero.interfaces.deploy:deploy",
    "CompiledModel": "hetero.interfaces.api:CompiledModel",
    "CompiledLM": "hetero.interfaces.generate:CompiledLM",
    "FeedbackRounds": "hetero.partitioner.decisions:FeedbackRounds",
    "GenerationPlan": "hetero.partitioner.generation_plan:GenerationPlan",
    "Task": "hetero.partitioner.decisions:Task",
}

__version__ = "0.1.0"

__all__ = [
    "ArtifactCorrupt",
    "BackendAssignment",
    "CaptureError",
    "Cluster",
    "ClusterSpec",
    "CompileError",
    "CompiledLM",
    "CompiledModel",
    "ConfigError",
    "DeviceSpec",
    "FeedbackRounds",
    "GenerationPlan",
    "HeteroError",
    "InvalidInput",
    "LinkSpec",
    "Objective",
    "OpGraph",
    "PartitionError",
    "Plan",
    "PlanInfeasible",
    "Task",
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
        value = getattr(importlib.import_module(module), attr)
        globals()[name] = value  # later lookups skip this function
        return value
    raise AttributeError(f"module 'hetero' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
