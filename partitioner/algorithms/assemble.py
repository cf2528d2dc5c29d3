"""From a solved Problem to a Plan: acyclic partitions, transfers, predicted times, memory."""

from __future__ import annotations

import networkx as nx
import numpy as np

from hetero.errors import PlanInfeasible
from hetero.partitioner.algorithms.adapter import Context, gib, host_dtype_of
from hetero.partitioner.algorithms.overlap import caller_io, schedule
from hetero.partitioner.algorithms.problem import SPLIT, Problem, Solution
from hetero.partitioner.decisions import Objective
from hetero.partitioner.plan import Plan, PlannedPartition, Transfer


def check_solution(problem: Problem, solution: Solution) -> None:
    """Raise PlanInfeasible, saying which device lacks what, unless the solution fits."""
    assign = solution.assign
    if problem.n and not np.isfinite(solution.seconds):
        raise PlanInfeasible(
            f"{solution.algorithm} found no placement where every group runs and fits; "
            + _memory_summary(problem)
        )
    over = problem.overflow(assign)
    if over.any():
        need = problem.memory(assign)
        lines = [
            f"  {problem.devices[d]} lacks {gib(over[d])}: the plan needs {gib(need[d])}, "
            f"it has {gib(problem.capacity[d])}"
            for d in np.flatnonzero(over)
        ]
        raise PlanInfeasible(
            "the model does not fit the cluster's memory:\n"
            + "\n".join(lines)
            + "\n"
            + _memory_summary(problem)
        )


def _memory_summary(problem: Problem) -> str:
    total = problem.param_bytes.sum()
    caps = ", ".join(
        f"{d} {gib(c)}" for d, c in zip(problem.devices, problem.capacity, strict=True)
    )
    return (
        f"weights total {gib(total)}; device memory: {caps}. What to do: add devices or memory, "
        "allow weight streaming to GPUs (keep a host CPU in the cluster), or lower the batch."
    )


def form_partitions(problem: Problem, assign: np.ndarray, graph: nx.DiGraph) -> list[list[int]]:
    """Groups per partition, partitions in a topological order.

    Walks a topological order that stays on the current placement while it can, and cuts
    where the placement changes: runs of a topological order never form a cycle, so
    `torch.fx` split_module accepts them, and staying put keeps the number of runs small.
    """
    names = problem.names
    index = {name: i for i, name in enumerate(names)}
    indeg = {i: 0 for i in range(problem.n)}
    succ: dict[int, list[int]] = {i: [] for i in range(problem.n)}
    for u, v in graph.edges:
        indeg[index[v]] += 1
        succ[index[u]].append(index[v])
    ready = sorted(i for i, k in indeg.items() if k == 0)
    runs: list[list[int]] = []
    current = None
    while ready:
        same = [i for i in ready if assign[i] == current]
        pick = same[0] if same else ready[0]
        ready.remove(pick)
        if runs and assign[pick] == current:
            runs[-1].append(pick)
        else:
            runs.append([pick])
            current = assign[pick]
        for s in succ[pick]:
            indeg[s] -= 1
            if indeg[s] == 0:
                ready.append(s)
        ready.sort()
    return runs


def assemble(
    problem: Problem,
    ctx: Context,
    solution: Solution,
    *,
    objective: Objective,
    microbatches: int = 1,
) -> Plan:
    check_solution(problem, solution)
    groups, cluster, cm = ctx.groups, ctx.cluster, ctx.cost_model
    og = groups.opgraph
    assign = solution.assign
    runs = form_partitions(problem, assign, groups.graph)
    part_of_op: dict[str, int] = {}
    partitions: list[PlannedPartition] = []
    # per group, what it adds to the step: its compute, or where weight copies overlap
    # other groups' work, its time in the replayed step (the wait for its weights included)
    if problem.overlapped:
        step_s = schedule(problem, assign).durations() - caller_io(problem, assign)
    else:
        step_s = problem.compute[np.arange(problem.n), assign]
    for k, run in enumerate(runs):
        p = int(assign[run[0]])
        pl = problem.placements[p]
        device = cluster.device(problem.devices[pl.device])
        resident = next(
            q
            for q, other in enumerate(problem.placements)
            if other.device == pl.device and not problem.place_streamed[q]
        )
        nodes = tuple(n for i in run for n in groups.groups[i].nodes)
        for n in nodes:
            part_of_op[n] = k
        gs = [groups.groups[i] for i in run]
        # each partition is one more call than its ops, priced for the backend it runs
        backend = ctx.backends.for_device(device)
        call = cm.call_overhead(device, backend)
        compute = float(problem.compute[run, resident].sum())
        splits = ctx.splits or {}
        is_split = pl.weights == SPLIT
        split = (
            tuple((g.name, splits[i].fraction) for i, g in zip(run, gs, strict=True))
            if is_split
            else ()
        )
        whole = (
            tuple(
                (g.name, splits[i].whole) for i, g in zip(run, gs, strict=True) if splits[i].whole
            )
            if is_split
            else ()
        )
        if is_split:
            stream = sum(splits[i].link_s for i in run)
        elif problem.place_streamed[p]:
            # overlapped: its copies run beside the CPU's work, priced as the problem was
            beside = (
                host_dtype_of(cluster, device, [og[n] for n in nodes], ctx.host_dtypes)
                if problem.overlapped
                else None
            )
            stream = sum(cm.stream_time(cluster, device, g.param_bytes, beside) for g in gs)
        else:
            stream = 0.0
        partitions.append(
            PlannedPartition(
                index=k,
                nodes=nodes,
                groups=tuple(g.name for g in gs),
                device=device.name,
                backend=backend,
                weights=pl.weights,
                predicted_ms=1e3 * (float(step_s[run].sum()) + call),
                compute_ms=1e3 * compute,
                weight_stream_ms=1e3 * stream,
                flops=int(sum(g.flops for g in gs) * ctx.scale),
                param_bytes=int(sum(g.param_bytes for g in gs)),
                memory_bytes=int(_run_memory(problem, run, p)),
                emulated=device.emulated,
                split=split,
                cpu_dtype=(
                    splits[run[0]].cpu_dtype if is_split else ctx.host_dtypes.get(device.name, "")
                ),
                state_bytes=int(sum(g.state_bytes for g in gs)),
                group_sizes=tuple(len(g.nodes) for g in gs),
                split_whole=whole,
                host_ms=1e3 * sum(splits[i].path_s for i in run) if is_split else 0.0,
                handoffs=sum(splits[i].handoffs for i in run) if is_split else 0,
                cpu_ms=1e3 * sum(splits[i].cpu_calibrated_s for i in run) if is_split else 0.0,
            )
        )
    transfers = _transfers(problem, ctx, partitions, part_of_op)
    used = sorted({problem.place_device[int(p)] for p in assign})
    need = problem.memory(assign)
    memory = tuple((problem.devices[d], int(need[d])) for d in used)
    notes = list(ctx.notes) + list(solution.notes)
    if objective.pipelined:
        incoming: dict[int, float] = {}
        for t in transfers:
            if t.dst >= 0:
                incoming[t.dst] = incoming.get(t.dst, 0.0) + t.predicted_ms
        stage = [p.predicted_ms + incoming.get(p.index, 0.0) for p in partitions]
        predicted = max(stage, default=0.0)
        fill = sum(stage) + (microbatches - 1) * predicted
        notes.append(
            f"pipeline of {len(partitions)} stage(s): {predicted:.3f} ms per microbatch at steady "
            f"state; {microbatches} microbatch(es) take about {fill:.3f} ms"
        )
    else:
        predicted = sum(p.predicted_ms for p in partitions) + sum(t.predicted_ms for t in transfers)
    if any(p.emulated for p in partitions):
        notes.append("NPU partitions compile through TVM for this host and run emulated")
    return Plan(
        model=og.model_name,
        cluster=cluster.name,
        objective=objective,
        algorithm=solution.algorithm,
        partitions=tuple(partitions),
        transfers=tuple(transfers),
        predicted_ms=predicted,
        microbatches=microbatches,
        rejections=ctx.rejections,
        memory=memory,
        notes=tuple(notes),
    )


def _run_memory(problem: Problem, run: list[int], p: int) -> float:
    params = problem.split_bytes[run] if problem.place_split[p] else problem.param_bytes[run]
    w = 2 * params.max() if problem.place_streamed[p] else params.sum()
    return float(w + problem.state_bytes[run].sum() + problem.act_bytes[run].max())


def _transfers(problem, ctx: Context, partitions, part_of_op) -> list[Transfer]:
    og = ctx.groups.opgraph
    cluster, cm = ctx.cluster, ctx.cost_model
    origin = problem.devices[problem.origin]
    flows: dict[tuple[int, int], dict[str, None]] = {}
    for name, k in part_of_op.items():
        for v in og[name].inputs:
            if v in part_of_op and part_of_op[v] != k:
                flows.setdefault((part_of_op[v], k), {})[v] = None
            elif v in og.inputs:
                flows.setdefault((-1, k), {})[v] = None
    for out in og.outputs:
        if out in part_of_op:
            flows.setdefault((part_of_op[out], -1), {})[out] = None
    result = []
    caller_hop = cm.caller_hop()
    for (src, dst), values in sorted(flows.items()):
        a = partitions[src].device if src >= 0 else origin
        b = partitions[dst].device if dst >= 0 else origin
        if a == b and not (caller_hop and min(src, dst) < 0):
            continue  # stays in the device's memory (the caller's too, in process)
        nbytes = int(sum(og.value_bytes(v) for v in values) * ctx.scale)
        links = tuple(f"{l.a}<->{l.b} ({l.kind})" for l in cluster.route(a, b))
        seconds = cm.transfer_time(cluster, a, b, nbytes) if a != b else caller_hop
        result.append(
            Transfer(
                src=src,
                dst=dst,
                values=tuple(values),
                bytes=nbytes,
                src_device=a,
                dst_device=b,
                links=links,
                predicted_ms=1e3 * seconds,
            )
        )
    return result
