"""From a plan to stages: split the captured graph, compile each partition for its device
(cache hits for what was built before), and describe each as a StageSpec.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileOptions, CompileUnit
from hetero.backends.registry import BackendRegistry
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.compile_times import CompileClock
from hetero.errors import CompileError, ConfigError
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.split import Partition, eager_values, param_values, split
from hetero.runtime.artifacts import build_artifact, manifest_io
from hetero.runtime.choice import Chooser
from hetero.runtime.stage import StageSpec
from hetero.runtime.streaming import (
    STREAM_BACKEND,
    STREAMED,
    piece_assignment,
    streamed_options,
)


def example_env(
    graph: OpGraph, parts: Sequence[Partition], example_inputs: Sequence[Any] | None = None
) -> dict[str, Any]:
    """Every boundary value of one eager run (the examples each partition compiles for)."""
    if example_inputs is None:
        args, kwargs = graph.program.example_inputs or ((), {})
    else:
        args, kwargs = tuple(example_inputs), {}
    return eager_values(graph, parts, *args, **kwargs)


def dynamic_dims(graph: OpGraph, names: Sequence[str]) -> tuple[tuple[int, int, str], ...]:
    """(input index, dim, symbol) of every symbolic dim among a partition's inputs; dim -1
    marks a size handed over as an int. Empty for a graph captured with static shapes."""
    if not graph.dynamic:
        return ()
    out = []
    for i, name in enumerate(names):
        try:
            meta = graph.value_meta(name)
        except KeyError:
            continue
        if meta.dtype == "symint":
            out.append((i, -1, str(meta.shape[0]) if meta.shape else ""))
            continue
        out.extend((i, d, s) for d, s in enumerate(meta.shape) if isinstance(s, str))
    return tuple(out)


def on_host(unit: CompileUnit) -> CompileUnit:
    """The unit with its examples and weights in host memory. A model that lives on a GPU
    hands over CUDA tensors (weights, constants such as rotary tables, the eager run's
    activations), which a CPU or NPU partition can neither trace nor run with."""
    return on_device(unit, torch.device("cpu"))


def trace_device(device: DeviceSpec) -> torch.device:
    """Where a partition for `device` is traced: the GPU itself when this process has one
    (a GPU partition runs its factory ops there), else the host."""
    if device.kind == "gpu" and torch.cuda.is_available():
        return torch.device("cuda", device.index)
    return torch.device("cpu")


def on_device(unit: CompileUnit, device: torch.device) -> CompileUnit:
    """The unit with its examples, weights and the tensors its graph makes on `device`: a
    model captured on one device (a GPU, or the host when it does not fit the GPU) makes
    its positions and masks there (`arange(..., device=...)`) and keeps its constants
    there, which a partition placed elsewhere can neither trace nor run with."""

    def move(t):
        return t.to(device) if isinstance(t, torch.Tensor) and t.device != device else t

    retarget(unit.module, device)
    return dataclasses.replace(
        unit,
        example_inputs=tuple(pytree.tree_map(move, tuple(unit.example_inputs))),
        param_values=(
            dict(unit.param_values)
            if unit.bound_params  # bound at run time: traced where they are, moved there
            else {k: move(v) for k, v in unit.param_values.items()}
        ),
    )


def retarget(gm, device: torch.device) -> None:
    """Point the partition's own tensors at `device`, in place (each partition has its own
    GraphModule)."""
    changed = False
    for node in gm.graph.nodes:
        dev = node.kwargs.get("device")
        if dev is not None and torch.device(dev) != device:
            node.kwargs = {**node.kwargs, "device": device}
            changed = True
        elif node.op == "get_attr":
            t = getattr(gm, node.target, None)
            if isinstance(t, torch.Tensor) and t.device != device:
                setattr(gm, node.target, t.to(device))
    if changed:
        gm.recompile()


def compile_partitions(
    graph: OpGraph,
    parts: Sequence[Partition],
    placements: Sequence[tuple[DeviceSpec, str]],
    cache_dir: str | Path,
    *,
    registry: BackendRegistry,
    example_inputs: Sequence[Any] | None = None,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
    predicted_ms: Sequence[float] | None = None,
    indices: Sequence[int] | None = None,
    streamed: Sequence[tuple[int, int] | None] | None = None,
    chooser: Chooser | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    clock: CompileClock | None = None,
) -> list[StageSpec]:
    """Compile `parts[i]` for `placements[i]` = (device, backend name); one stage each.

    `registry`: the backend registry the plan was made with (its names name these backends).
    `options` is one CompileOptions for all, or a mapping backend name -> options.
    `indices` renames the stages (the plan's partition indices); default: Partition.index.
    `streamed[i]` = (plan partition, piece number) makes stage i a streamed piece: compiled
    by the eager backend with its parameters as inputs (runtime/streaming.py); None: resident.
    `chooser`: a resident partition's backend is chosen by measurement among those of its
    device kind (runtime/choice.py); the stage runs the chosen one. None: the placement's.
    `progress(what, done, total)` hears of each partition compiled (or found in the cache).
    `clock` hears where the time went (the chooser's own clock when there is a chooser).
    """
    if len(placements) != len(parts):
        raise ConfigError(f"{len(parts)} partitions but {len(placements)} placements")
    clock = chooser.clock if chooser is not None else clock or CompileClock()
    with clock.phase("eager run"):  # every partition's example inputs
        env = example_env(graph, parts, example_inputs)
    params = param_values(graph)
    stages = []

    def options_for(name: str) -> CompileOptions:
        opts = options.get(name) if isinstance(options, Mapping) else options
        return opts or CompileOptions()

    report = progress or (lambda what, done, total: None)
    report("compiling partitions", 0, len(parts))
    for i, (part, (device, backend_name)) in enumerate(zip(parts, placements, strict=True)):
        piece = streamed[i] if streamed else None
        opts = options_for(backend_name)
        if piece is not None:
            backend_name = STREAM_BACKEND
            opts = streamed_options(opts)
        unit = CompileUnit.from_partition(part, env, params, dynamic_dims(graph, part.inputs))
        unit = on_device(unit, trace_device(device))
        if chooser is not None and piece is None:
            ops = [graph[n] for n in part.nodes if n in graph.nodes]
            backend_name, art = chooser.build(
                part.index if indices is None else indices[i],
                unit,
                device,
                backend_name,
                options_for,
                ops,
                reference=tuple(env[o] for o in unit.outputs),
                root=Path(cache_dir),
                state=any(op.state_bytes for op in ops),
            )
            opts = options_for(backend_name)
        else:
            art = build_artifact(
                registry.get(backend_name), unit, device, opts, Path(cache_dir), clock
            )
        ins, outs = manifest_io(art)
        if (ins and len(ins) != len(unit.inputs)) or (outs and len(outs) != len(unit.outputs)):
            raise CompileError(
                f"artifact {art.key} at {art.path} takes {len(ins)} inputs and returns "
                f"{len(outs)} values; partition {unit.name} has {len(unit.inputs)} and "
                f"{len(unit.outputs)}: delete the artifact and compile again"
            )
        stages.append(
            StageSpec(
                index=part.index if indices is None else indices[i],
                device=device,
                backend=backend_name,
                artifact=art,
                # by this unit's names: the cache shares one artifact between identical
                # partitions (two layers' attention math), whose manifest names the first's
                inputs=unit.inputs,
                outputs=unit.outputs,
                nodes=part.nodes,
                predicted_ms=predicted_ms[i] if predicted_ms else 0.0,
                options=opts,
                weights="streamed" if piece is not None else "resident",
                params=unit.params if piece is not None else (),
                partition=piece[0] if piece is not None else None,
                piece=piece[1] if piece is not None else 0,
            )
        )
        report("compiling partitions", i + 1, len(parts))
    return stages


def compile_plan(
    graph: OpGraph,
    plan: Plan,
    cluster: ClusterSpec,
    cache_dir: str | Path,
    *,
    registry: BackendRegistry,
    example_inputs: Sequence[Any] | None = None,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
    chooser: Chooser | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    clock: CompileClock | None = None,
) -> list[StageSpec]:
    """The stages of `plan`, in a topological order, named by the plan's partition indices.

    A streamed partition becomes one stage per group (runtime/streaming.py): its first
    piece keeps the partition's index, the others get indices after the plan's.
    `chooser`: measure the backend of each partition the plan did not measure already
    (`PlannedPartition.choice`); `chooser.apply(plan)` then records what it chose.
    """
    clock = chooser.clock if chooser is not None else clock or CompileClock()
    with clock.phase("split"):
        assignment, pieces = piece_assignment(graph, plan)
        parts = split(graph, assignment)
    fresh = max((p.index for p in plan.partitions), default=-1) + 1
    if chooser is not None:  # a plan measured before (prebuilt, deployed) keeps its choice
        chooser.skip.update(p.index for p in plan.partitions if p.choice)
    placements, predicted, indices, streamed = [], [], [], []
    for part in parts:
        # split() renumbers partitions in topological order; its nodes name the pieces.
        plan_index, number = pieces[assignment[part.nodes[0]]] if part.nodes else (part.index, 0)
        p = plan.partition(plan_index)
        placements.append((cluster.device(p.device), p.backend))
        is_streamed = p.weights == STREAMED
        streamed.append((plan_index, number) if is_streamed else None)
        if number == 0:
            indices.append(plan_index)
        else:
            indices.append(fresh)
            fresh += 1
        share = 1.0
        if is_streamed:
            own = sum(graph[n].param_bytes for n in part.nodes if n in graph.nodes)
            total = sum(graph[n].param_bytes for n in p.nodes if n in graph.nodes)
            share = own / total if total else 1.0 / max(1, len(p.groups))
        predicted.append(p.predicted_ms * share)
    return compile_partitions(
        graph,
        parts,
        placements,
        cache_dir,
        example_inputs=example_inputs,
        registry=registry,
        options=options,
        predicted_ms=predicted,
        indices=indices,
        streamed=streamed,
        chooser=chooser,
        progress=progress,
        clock=clock,
    )


def needed_outputs(graph: OpGraph) -> tuple[str, ...]:
    """The values a full run must return (the model's flattened outputs)."""
    return tuple(o for o in graph.outputs if o)
