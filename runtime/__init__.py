"""Running a plan: stages on device workers (Ray actors) joined by a compiled Ray graph,
or all in this process.

    stages = compile_plan(graph, plan, cluster, cache_dir, registry=registry)  # runtime/build
    ex = LocalExecutor(stages, needed_outputs(graph), registry)     # one process
    ex = RayExecutor(stages, needed_outputs(graph), cluster=cluster, plan=plan, replan=hook,
                     registry=registry)
    out = ex.run({"x": x})         # graph value name -> tensor
    ex.run_many([...])             # microbatches, pipelined on Ray
    ex.measured_ms(); print(ex.metrics.table()); ex.shutdown()

Names load lazily so `import hetero.runtime` never imports Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "StageSpec": "hetero.runtime.stage",
    "Executor": "hetero.runtime.stage",
    "LocalExecutor": "hetero.runtime.executor",
    "RayExecutor": "hetero.runtime.ray_executor",
    "compile_plan": "hetero.runtime.build",
    "compile_partitions": "hetero.runtime.build",
    "needed_outputs": "hetero.runtime.build",
    "verify": "hetero.runtime.verify",
    "VerifyReport": "hetero.runtime.verify",
    "measure_throughput": "hetero.runtime.pipeline",
    "StagedPlan": "hetero.runtime.replan",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'hetero.runtime' has no attribute {name!r}")
