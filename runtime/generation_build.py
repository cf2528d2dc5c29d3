"""From a GenerationPlan to stages: both phases' partitions compiled, each with its weights
and its state as runner inputs, so that one copy of the weights per device (and one KV
cache) serves prefill and decode.

A streamed or split partition becomes one stage per group that holds weights (one weight
streamer item per layer: the planner's memory model holds two of them on the GPU). A split
stage's program is rewritten before compiling (runtime/split_linear.py): its weight
matmuls call `hetero::gpu_cpu_mm` (a whole MLP block, `hetero::gpu_cpu_mlp`) with the GPU's
share and the CPU's share as two inputs;
the CPU's rows are stored in the plan's CPU dtype. A CPU partition with a CPU dtype computes
in it (runtime/retype.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileOptions, CompileUnit
from hetero.backends.export import built_program
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.compile_times import CompileClock
from hetero.errors import CompileError
from hetero.partitioner.generation_plan import GenerationPlan
from hetero.partitioner.gpu_cpu_split import split_matmuls
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.phases import PROMPT, LMGraphs, Phase
from hetero.partitioner.plan import Plan, PlannedPartition
from hetero.partitioner.split import param_values, split
from hetero.runtime.artifacts import build_artifact
from hetero.runtime.build import dynamic_dims, example_env, on_device, trace_device
from hetero.runtime.retype import retype_unit
from hetero.runtime.split_linear import split_program
from hetero.runtime.stage import StageSpec


def example_inputs(lm: LMGraphs, phase: Phase) -> tuple[torch.Tensor, torch.Tensor]:
    """The inputs a phase's partitions compile with: the capture's prompt length for prefill,
    one token after it for decode."""
    graph = lm.graph(phase)
    meta = graph.inputs[PROMPT]
    device = _device_of(graph)
    ids = torch.zeros(meta.hint, dtype=torch.long, device=device)
    start = torch.tensor(0 if phase is Phase.PREFILL else lm.max_len // 2, device=device)
    return ids, start


def _device_of(graph: OpGraph) -> torch.device:
    for t in graph.program.state_dict.values():
        if isinstance(t, torch.Tensor):
            return t.device
    return torch.device("cpu")


def pieces(plan: Plan, graph: OpGraph) -> tuple[dict[str, int], dict[int, tuple[int, int, str]]]:
    """op -> piece id, and piece id -> (plan partition, piece number, group). A resident
    partition is one piece; a streamed or split one, a piece per group holding weights
    (groups without weights ride with the piece before them, or with the first)."""
    assignment: dict[str, int] = {}
    meta: dict[int, tuple[int, int, str]] = {}
    nid = 0
    for p in plan.partitions:
        if p.weights == "resident" or not p.group_sizes:
            meta[nid] = (p.index, 0, p.groups[0] if p.groups else "")
            assignment.update(dict.fromkeys(p.nodes, nid))
            nid += 1
            continue
        offset, current, current_weighted, number = 0, -1, False, -1
        for group, size in zip(p.groups, p.group_sizes, strict=True):
            ops = p.nodes[offset : offset + size]
            offset += size
            weighted = any(graph[n].param_bytes for n in ops if n in graph.nodes)
            if current < 0 or (weighted and current_weighted):
                number, current, current_weighted = number + 1, nid, False
                meta[nid] = (p.index, number, group)
                nid += 1
            elif weighted:
                meta[current] = (p.index, number, group)  # the piece is named by its weights
            current_weighted = current_weighted or weighted
            assignment.update(dict.fromkeys(ops, current))
    return assignment, meta


def _fraction(p: PlannedPartition, group: str) -> float:
    return dict(p.split).get(group, p.split[0][1] if p.split else 1.0)


def _whole(p: PlannedPartition, group: str) -> frozenset[str]:
    """The weights `group` streams whole instead of sharing them (no hand-off for them)."""
    return frozenset(dict(p.split_whole).get(group, ()))


def compile_generation(
    lm: LMGraphs,
    gplan: GenerationPlan,
    cluster: ClusterSpec,
    cache_dir: str | Path,
    *,
    registry: BackendRegistry | None = None,
    options: Mapping[str, CompileOptions] | None = None,
    clock: CompileClock | None = None,
    built: Callable[[Phase, tuple[StageSpec, ...]], object] | None = None,
) -> dict[Phase, tuple[StageSpec, ...]]:
    """Every stage of both phases, compiled (cache hits for what was built before); `clock`
    hears where the time went (hetero/compile_times.py); `built(phase, stages)` is called as
    soon as a phase's stages are (prefill's before decode's are built: its warmings,
    runtime/stage_warming.py, start then)."""
    registry = registry or default_registry()
    clock = clock if clock is not None else CompileClock()
    out = {}
    for phase in Phase:
        out[phase] = _compile_phase(
            lm, phase, gplan.plan(phase), cluster, Path(cache_dir), registry, options or {}, clock
        )
        if built is not None:
            built(phase, out[phase])
    return out


def _compile_phase(
    lm: LMGraphs,
    phase: Phase,
    plan: Plan,
    cluster: ClusterSpec,
    cache_dir: Path,
    registry: BackendRegistry,
    options: Mapping[str, CompileOptions],
    clock: CompileClock,
) -> tuple[StageSpec, ...]:
    graph = lm.graph(phase)
    with clock.phase("split"):
        assignment, meta = pieces(plan, graph)
        parts = split(graph, assignment)
    with clock.phase("eager run"):
        env = example_env(graph, parts, example_inputs(lm, phase))
    params = param_values(graph)
    count: dict[int, int] = {}
    for plan_index, _, _ in meta.values():
        count[plan_index] = count.get(plan_index, 0) + 1
    fresh = max((p.index for p in plan.partitions), default=-1) + 1
    stages = []
    for part in parts:
        plan_index, number, group = meta[assignment[part.nodes[0]]]
        p = plan.partition(plan_index)
        device = cluster.device(p.device)
        backend = registry.get(p.backend)
        unit = CompileUnit.from_partition(part, env, params, dynamic_dims(graph, part.inputs))
        holds = bool(getattr(backend, "holds_state", False))
        shared: tuple = ()
        if p.weights == "split":
            unit, shared = _split_unit(
                graph, unit, part.nodes, _fraction(p, group), p.cpu_dtype, _whole(p, group)
            )
        elif p.cpu_dtype:
            unit = retype_unit(unit, getattr(torch, p.cpu_dtype))
        opts = options.get(p.backend) or CompileOptions()
        if holds:
            # Traced on the host whatever it runs on: its weights are bound at load (no
            # copy of them on the GPU while compiling), and the worker points the program's
            # own tensors at its device then (runtime/generation.py).
            unit = on_device(dataclasses.replace(unit, bound_params=True), torch.device("cpu"))
        elif any(x in graph.state for x in unit.params):
            raise CompileError(
                f"partition p{plan_index} ({phase.value}) updates the KV cache but runs on "
                f"{device.name} through {p.backend}, which keeps no state; plan again with "
                "hetero.plan_generation"
            )
        else:
            unit = on_device(unit, trace_device(device))
        if holds:  # its program kept when made now (not a cache hit), for this process's binder
            unit = unit.sharing_exports()
        art = build_artifact(backend, unit, device, opts, cache_dir, clock)
        index = plan_index if number == 0 else fresh
        if number:
            fresh += 1
        stages.append(
            StageSpec(
                index=index,
                device=device,
                backend=p.backend,
                artifact=art,
                inputs=unit.inputs,
                outputs=unit.outputs,
                nodes=part.nodes,
                predicted_ms=p.predicted_ms / count[plan_index],
                options=opts,
                weights=p.weights,
                params=unit.params if holds else (),
                partition=plan_index if p.weights != "resident" else None,
                piece=number,
                state=tuple(x for x in unit.params if x in graph.state),
                cpu_shares=tuple(f"cpu{k}" for k in range(len(shared))),
                phase=phase.value,
                shares=shared,
                cpu_dtype=p.cpu_dtype,
                program=built_program(unit),
            )
        )
    return tuple(stages)


def _split_unit(
    graph: OpGraph,
    unit: CompileUnit,
    nodes: Sequence[str],
    fraction: float,
    cpu_dtype: str,
    whole: frozenset[str] = frozenset(),
) -> tuple[CompileUnit, tuple]:
    """The unit with its weight matmuls through gpu_cpu_mm and gpu_cpu_mlp, but those of
    the `whole` weights (streamed to the GPU whole, as a streamed stage's); (unit, its
    shared groups). The shares it traces with are empty tensors of the right shapes: the
    worker cuts the real ones from the weights it binds."""
    mms = split_matmuls(graph, nodes)
    shapes = {m.weight: (m.rows, m.cols) for m in mms if m.weight not in whole}
    names = (*unit.inputs, *unit.params)
    module, names, groups = split_program(unit.module, names, fraction, shapes)
    new_params = names[len(unit.inputs) :]
    values: dict[str, Any] = {k: v for k, v in unit.param_values.items() if k in new_params}
    for k, g in enumerate(groups):
        first = unit.param_values[g.weights[0]]
        dtype = getattr(torch, cpu_dtype) if cpu_dtype else first.dtype
        # cut on the meta device: the shapes without copying any weight
        gpu, cpu = g.cut({w: unit.param_values[w].to("meta") for w in g.weights}, dtype)
        values[f"gpu{k}"] = torch.empty(gpu.shape, dtype=first.dtype, device=first.device)
        values[f"cpu{k}"] = torch.empty(cpu.shape, dtype=dtype, device=first.device)
    return dataclasses.replace(unit, module=module, params=new_params, param_values=values), groups
