"""From a plan to stages: split the captured graph, compile each partition for its device
(cache hits for what was built before), and describe each as a StageSpec.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileOptions, CompileUnit
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.split import Partition, flatten_inputs, param_values, split
from hetero.runtime.artifacts import build_artifact, manifest_io
from hetero.runtime.stage import StageSpec


def example_env(
    graph: OpGraph, parts: Sequence[Partition], example_inputs: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Every boundary value of one eager run (the examples each partition compiles for)."""
    if example_inputs is None:
        args, kwargs = graph.program.example_inputs or ((), {})
    else:
        args, kwargs = tuple(example_inputs), {}
    env: dict[str, Any] = dict(param_values(graph))
    env.update(flatten_inputs(graph, args, kwargs))
    with torch.no_grad():
        for p in parts:
            env.update(zip(p.outputs, p(env), strict=True))
    return env


def compile_partitions(
    graph: OpGraph,
    parts: Sequence[Partition],
    placements: Sequence[tuple[DeviceSpec, str]],
    cache_dir: str | Path,
    *,
    example_inputs: Sequence[Any] | None = None,
    registry: BackendRegistry | None = None,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
    predicted_ms: Sequence[float] | None = None,
    indices: Sequence[int] | None = None,
) -> list[StageSpec]:
    """Compile `parts[i]` for `placements[i]` = (device, backend name); one stage each.

    `options` is one CompileOptions for all, or a mapping backend name -> options.
    `indices` renames the stages (the plan's partition indices); default: Partition.index.
    """
    if len(placements) != len(parts):
        raise ConfigError(f"{len(parts)} partitions but {len(placements)} placements")
    registry = registry or default_registry()
    env = example_env(graph, parts, example_inputs)
    params = param_values(graph)
    stages = []
    for i, (part, (device, backend_name)) in enumerate(zip(parts, placements, strict=True)):
        backend = registry.get(backend_name)
        opts = options.get(backend_name) if isinstance(options, Mapping) else options
        opts = opts or CompileOptions()
        unit = CompileUnit.from_partition(part, env, params)
        art = build_artifact(backend, unit, device, opts, Path(cache_dir))
        ins, outs = manifest_io(art)
        stages.append(
            StageSpec(
                index=part.index if indices is None else indices[i],
                device=device,
                backend=backend_name,
                artifact=art,
                inputs=ins or unit.inputs,
                outputs=outs or unit.outputs,
                nodes=part.nodes,
                predicted_ms=predicted_ms[i] if predicted_ms else 0.0,
                options=opts,
            )
        )
    return stages


def compile_plan(
    graph: OpGraph,
    plan: Plan,
    cluster: ClusterSpec,
    cache_dir: str | Path,
    *,
    example_inputs: Sequence[Any] | None = None,
    registry: BackendRegistry | None = None,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
) -> list[StageSpec]:
    """The stages of `plan`, in a topological order, named by the plan's partition indices."""
    assignment = plan.assignment()
    parts = split(graph, assignment)
    planned = []
    for part in parts:
        # split() renumbers partitions in topological order; its nodes name the plan's.
        index = assignment[part.nodes[0]] if part.nodes else part.index
        planned.append(plan.partition(index))
    return compile_partitions(
        graph,
        parts,
        [(cluster.device(p.device), p.backend) for p in planned],
        cache_dir,
        example_inputs=example_inputs,
        registry=registry,
        options=options,
        predicted_ms=[p.predicted_ms for p in planned],
        indices=[p.index for p in planned],
    )


def needed_outputs(graph: OpGraph) -> tuple[str, ...]:
    """The values a full run must return (the model's flattened outputs)."""
    return tuple(o for o in graph.outputs if o)
