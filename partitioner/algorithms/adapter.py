"""From (GroupGraph, ClusterSpec, CostModel, backends, constraints) to a `Problem`, recording
why each group or op is kept off a device."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np

from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.errors import ConfigError, PlanInfeasible
from hetero.partitioner.algorithms.problem import (
    INF,
    RESIDENT,
    SPLIT,
    STREAMED,
    Placement,
    Problem,
)
from hetero.partitioner.coarsen import GroupGraph
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import (
    FALLBACK_BACKEND,
    BackendAssignment,
    HostPrecision,
    Objective,
)
from hetero.partitioner.gpu_cpu_split import SplitCost, SplitDecision, split_cost
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.host_dtype import retyped
from hetero.partitioner.plan import Rejection


class BackendLookup(Protocol):
    """What the planner asks of the backend registry it is given (hetero.backends.registry):
    names, and per backend `available()`, `supports(op, device)` and `fuses`."""

    def names(self) -> list[str]: ...

    def get(self, name: str) -> Any: ...

    def __contains__(self, name: str) -> bool: ...


@dataclass(frozen=True)
class Context:
    """What the Plan needs besides the solution: the inputs the problem was built from."""

    groups: GroupGraph
    cluster: ClusterSpec
    cost_model: CostModel
    backends: BackendAssignment  # resolved: the backend each device kind runs
    scale: float  # activation scale (1 / microbatches)
    rejections: tuple[Rejection, ...]
    notes: tuple[str, ...]
    splits: Mapping[int, SplitCost] = None  # group index -> its GPU/CPU split, where priced
    # device -> the dtype its partitions compute in where not the model's (host_dtype.py)
    host_dtypes: Mapping[str, str] = field(default_factory=dict)


def resolve_backends(
    cluster: ClusterSpec, backends: BackendAssignment, registry: BackendLookup
) -> tuple[BackendAssignment, tuple[str, ...]]:
    """The assignment with every kind the cluster has mapped to a usable backend: eager
    (with a note) where the asked one is unknown, fails to import or is unavailable here."""
    resolved = backends
    notes: list[str] = []
    for kind in dict.fromkeys(d.kind for d in cluster.devices):
        name = backends.for_kind(kind)
        why = ""
        if name not in registry:
            why = f"no backend named {name!r} (known: {', '.join(registry.names())})"
        else:
            try:
                ok = registry.get(name).available()
                if not ok:
                    why = f"{name} is not available here: {getattr(ok, 'reason', '') or 'no reason given'}"
            except Exception as e:  # a plug-in that fails to import must not stop planning
                why = f"{name} failed to load ({type(e).__name__}: {e})"
        if why:
            notes.append(f"{kind}: {why}; planning with {FALLBACK_BACKEND} instead")
            resolved = resolved.with_kind(kind, FALLBACK_BACKEND)
    return resolved, tuple(notes)


def with_fusing(cost_model: CostModel, names: Sequence[str], registry: BackendLookup) -> CostModel:
    """The cost model told which of the backends `names` fuse (each declares `fuses`)."""
    fusing = frozenset(n for n in names if registry.get(n).fuses)
    if fusing <= cost_model.fusing_backends:
        return cost_model
    return replace(cost_model, fusing_backends=cost_model.fusing_backends | fusing)


def host_dtype_of(cluster: ClusterSpec, device, ops, host_dtypes) -> str:
    """The dtype `device`'s host CPU computes in: its chosen one, else the model's (that of
    `ops`)."""
    host = cluster.host_cpu(device.host)
    chosen = (host_dtypes or {}).get(host.name, "") if host is not None else ""
    return chosen or (ops[0].dtype if ops else "")


def _streamed_time(
    cm: CostModel, cluster: ClusterSpec, group, ops, device, backend: str, scale, beside: str | None
) -> tuple[float, float, float]:
    """A group run as a streamed piece: (its time with the weights at hand, its weights'
    copy, its call). A stage of its own (one more call) whose kernels wait for the copy; on a GPU the
    host queues the piece's kernels while the copy runs, so the device's side (not the
    host's dispatch) overlaps the copy. `beside`: the dtype the host CPU computes in while
    the copy runs (an overlapped step's CPU layers and split rows); None: the copy runs alone."""
    if device.kind == "gpu" and not cm.fuses(backend):
        t = cm.kernel_time(ops, device, scale=scale, backend=backend)
    else:
        t = cm.group_time(group, ops, device, backend=backend, scale=scale)
    call = cm.call_overhead(device, backend) + cm.stream_call()
    return t, cm.stream_time(cluster, device, group.param_bytes, beside), call


def build_problem(
    groups: GroupGraph,
    cluster: ClusterSpec,
    cost_model: CostModel,
    *,
    backends: BackendAssignment,
    registry: BackendLookup,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    notes: Sequence[str] = (),
    split: bool = False,
    overlap: bool = False,
    host_dtypes: Mapping[str, str] | None = None,
    fixed_splits: Mapping[str, SplitDecision] | None = None,
    host_precision: HostPrecision = HostPrecision.MODEL,
) -> tuple[Problem, Context]:
    """`backends` as `resolve_backends` left it (every kind usable); `notes`: its notes.
    `split`: also offer GPUs the `split` weight home (partitioner/gpu_cpu_split.py), for
    bandwidth-bound steps (LLM decode). `overlap`: price weight copies as overlapping other
    groups' work (partitioner/algorithms/overlap.py), as a generation's streamer runs them.
    `host_dtypes`: devices whose partitions compute in another dtype than the model's
    (partitioner/host_dtype.py), priced so. `fixed_splits`: per group, the split share and
    trips a running plan uses, priced as they are rather than chosen again."""
    if microbatches < 1:
        raise ConfigError(f"microbatches must be at least 1, got {microbatches}")
    og = groups.opgraph
    devices = cluster.devices
    names = [d.name for d in devices]
    backend_of = {d.name: backends.for_device(d) for d in devices}
    cost_model = with_fusing(cost_model, sorted(set(backend_of.values())), registry)
    excluded = {cluster.device(x).name for x in exclude}
    pinned = _pins(groups, cluster, pins or {})
    scale = 1.0 / microbatches
    rejections: list[Rejection] = [
        Rejection("*", d, "excluded by the user") for d in names if d in excluded
    ]

    placements: list[Placement] = []
    for i, d in enumerate(devices):
        placements.append(Placement(i, RESIDENT))
        host = cluster.host_cpu(d.host)
        if d.kind == "gpu" and host is not None and host.name != d.name:
            placements.append(Placement(i, STREAMED))
            if split and host.name not in excluded:
                placements.append(Placement(i, SPLIT))

    n, num_p = len(groups), len(placements)
    compute = np.full((n, num_p), INF)
    own_s, copy_s = np.full((n, num_p), INF), np.zeros((n, num_p))
    split_bytes = np.zeros(n)
    splits: dict[int, SplitCost] = {}
    support_cache: dict[tuple[str, str], object] = {}
    for gi, g in enumerate(groups):
        ops = [og[x] for x in g.nodes]
        for di, d in enumerate(devices):
            if d.name in excluded:
                continue
            if g.name in pinned and pinned[g.name] != d.name:
                rejections.append(Rejection(g.name, d.name, f"pinned to {pinned[g.name]}"))
                continue
            bad = unsupported_ops(ops, d, backend_of[d.name], registry, support_cache)
            if g.state_bytes and not getattr(
                registry.get(backend_of[d.name]), "holds_state", False
            ):
                bad = [(g.name, f"{backend_of[d.name]} keeps no state (the KV cache it updates)")]
            if bad:
                for op, reason in bad:
                    rejections.append(Rejection(op, d.name, reason))
                if len(bad) < sum(op.op_class != "view" for op in ops):
                    rejections.append(
                        Rejection(
                            g.name,
                            d.name,
                            f"group kept together: {len(bad)} of its ops are unsupported there",
                        )
                    )
                continue
            dtype = (host_dtypes or {}).get(d.name, "")
            priced = [retyped(op, dtype) for op in ops] if dtype else ops
            t = cost_model.group_time(g, priced, d, backend=backend_of[d.name], scale=scale)
            for p, pl in enumerate(placements):
                if pl.device == di:
                    compute[gi, p] = t
                    own_s[gi, p] = t
                    if pl.weights == STREAMED:
                        # nothing to stream: such a group runs with a neighbour's piece
                        if g.param_bytes:
                            own, copy, call = _streamed_time(
                                cost_model,
                                cluster,
                                g,
                                ops,
                                d,
                                backend_of[d.name],
                                scale,
                                beside=host_dtype_of(cluster, d, ops, host_dtypes)
                                if overlap
                                else None,
                            )
                            compute[gi, p] = max(own, copy) + call
                            own_s[gi, p], copy_s[gi, p] = own + call, copy
                        else:
                            compute[gi, p] = INF
                    elif pl.weights == SPLIT:
                        compute[gi, p] = INF
                        host = cluster.host_cpu(d.host)
                        cost = split_cost(
                            og,
                            g,
                            ops,
                            d,
                            host,
                            cluster,
                            cost_model,
                            gpu_backend=backend_of[d.name],
                            cpu_backend=backend_of[host.name],
                            scale=scale,
                            fixed=(fixed_splits or {}).get(g.name),
                            host_precision=host_precision,
                        )
                        if cost is not None:
                            splits[gi] = cost
                            split_bytes[gi] = cost.gpu_bytes
                            call = cost_model.call_overhead(d, backend_of[d.name])
                            compute[gi, p] = cost.seconds + call
                            own_s[gi, p], copy_s[gi, p] = cost.path_s + call, cost.link_s

    index = groups.index
    edges = [(index[u], index[v], b * scale) for u, v, b in groups.graph.edges(data="bytes")]
    edges.sort()
    d_n = len(devices)
    lat = np.zeros((d_n, d_n))
    inv = np.zeros((d_n, d_n))
    for a in range(d_n):
        for b in range(d_n):
            if a != b:
                # two probes of the cost model give its latency and per-byte slope
                t1 = cost_model.transfer_time(cluster, names[a], names[b], 1.0)
                t2 = cost_model.transfer_time(cluster, names[a], names[b], 1e9 + 1.0)
                inv[a, b] = (t2 - t1) / 1e9
                # crossing to another device starts a partition there: one more call
                lat[a, b] = (
                    t1 - inv[a, b] + cost_model.call_overhead(devices[b], backend_of[names[b]])
                )
    call = np.array([cost_model.call_overhead(d, backend_of[d.name]) for d in devices])
    origin_dev = next((d for d in devices if d.kind == "cpu"), devices[0])
    problem = Problem(
        names=tuple(g.name for g in groups),
        devices=tuple(names),
        placements=tuple(placements),
        compute=compute,
        edges=np.array([(u, v) for u, v, _ in edges], dtype=int).reshape(-1, 2),
        edge_bytes=np.array([b for _, _, b in edges], dtype=float),
        link_latency=lat,
        link_inv_bw=inv,
        param_bytes=np.array([g.param_bytes for g in groups], dtype=float),
        act_bytes=np.array([_act_bytes(og, g) * scale for g in groups], dtype=float),
        capacity=np.array([d.memory or INF for d in devices], dtype=float),
        in_bytes=np.array([groups.input_bytes(g.name) * scale for g in groups], dtype=float),
        out_bytes=np.array([groups.output_bytes(g.name) * scale for g in groups], dtype=float),
        origin=names.index(origin_dev.name),
        state_bytes=np.array([g.state_bytes for g in groups], dtype=float),
        split_bytes=split_bytes,
        call=call,
        caller_hop=cost_model.caller_hop(),
        copy_s=copy_s if overlap else None,
        own_s=own_s if overlap else None,
    )
    _check_placeable(problem, groups, rejections)
    ctx = Context(
        groups=groups,
        cluster=cluster,
        cost_model=cost_model,
        backends=backends,
        scale=scale,
        rejections=tuple(rejections),
        notes=tuple(notes),
        splits=splits,
        host_dtypes=dict(host_dtypes or {}),
    )
    return problem, ctx


def problem_for(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: Objective,
    *,
    registry: BackendLookup,
    cost_model: CostModel,
    backends: BackendAssignment,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    groups: GroupGraph | None = None,
) -> tuple[Problem, Context]:
    """The problem a planner solves for these arguments: backends resolved once, the graph's
    groups refined where a device runs a group only in part (unless `groups` is given)."""
    resolved, notes = resolve_backends(cluster, backends, registry)
    if groups is None:
        groups = refine_for_support(
            graph.coarsen(), cluster, backends=resolved, exclude=exclude, registry=registry
        )
    return build_problem(
        groups,
        cluster,
        cost_model,
        backends=resolved,
        pins=pins,
        exclude=exclude,
        microbatches=microbatches if objective.pipelined else 1,
        registry=registry,
        notes=notes,
    )


def refine_for_support(
    groups: GroupGraph,
    cluster: ClusterSpec,
    *,
    backends: BackendAssignment,
    registry: BackendLookup,
    exclude: Sequence[str] = (),
    max_groups: int = 160,
) -> GroupGraph:
    """Split, one module level at a time, every group that a device runs only in part, so
    that a few unsupported ops (a dropout's clone, an int64 index) do not keep a whole
    block off that device. Stops at the deepest level or at `max_groups` groups.
    `backends`: resolved (see `resolve_backends`)."""
    backend_of = {d.name: backends.for_device(d) for d in cluster.devices}
    excluded = {cluster.device(x).name for x in exclude}
    devices = [d for d in cluster.devices if d.name not in excluded]
    og = groups.opgraph
    cache: dict = {}
    done: set[str] = set()
    changed = True
    while changed and len(groups) < max_groups:
        changed = False
        for g in groups:
            if g.name in done:
                continue
            ops = [og[x] for x in g.nodes]
            real = sum(op.op_class != "view" for op in ops)
            mixed = any(
                0 < len(unsupported_ops(ops, d, backend_of[d.name], registry, cache)) < real
                for d in devices
            )
            done.add(g.name)
            if mixed:
                finer = groups.refine(g.name)
                if finer is not groups:
                    groups, changed = finer, True
                    break
    return groups


def _act_bytes(og, group) -> int:
    """Peak activation bytes live while one of the group's ops runs: the liveness walk of
    `coarsen.live_bytes` (values from producer to last reader, views free, model outputs
    held to the end), so values crossing the group's boundaries count too."""
    return group.act_bytes


def _pins(groups: GroupGraph, cluster: ClusterSpec, pins: Mapping[str, str]) -> dict[str, str]:
    """group name -> device name, for groups inside a pinned module (or a pinned op)."""
    out: dict[str, str] = {}
    for key, dev in pins.items():
        target = cluster.device(dev).name
        hit = False
        for g in groups:
            if key in g.nodes or _inside(g.module, key) or _inside(g.name, key):
                out[g.name] = target
                hit = True
        if not hit:
            known = ", ".join(g.name for g in list(groups)[:12])
            raise ConfigError(
                f"pin {key!r} -> {dev!r} matches no module or op of the model; groups: {known} ..."
            )
    return out


def _inside(module: str, key: str) -> bool:
    return module == key or module.startswith(key + ".")


def unsupported_ops(ops, device: DeviceSpec, backend_name: str, registry, cache):
    """(op name, why) for each of `ops` that `backend_name` or `device` refuses."""
    backend = registry.get(backend_name)
    bad = []
    for op in ops:
        if op.op_class == "view":
            continue
        # what a backend's supports() reads of an op is not its name: the 80 layers of a
        # LLaMA ask once per distinct op (signatures numbered once per op name)
        sig = cache.get(op.name)
        if sig is None:
            sig = cache.setdefault((op.target, op.op_class, op.in_meta, op.out_meta), len(cache))
            cache[op.name] = sig
        key = (sig, device.name)
        if key not in cache:
            reason = ""
            if _is_float(op.dtype) and op.dtype not in device.dtypes:
                reason = (
                    f"dtype {op.dtype} is not one {device.name} runs ({', '.join(device.dtypes)})"
                )
            else:
                try:
                    ok = backend.supports(op, device)
                except Exception as e:  # supports() must not raise; treat it as a "no"
                    ok, reason = False, f"{backend_name}.supports raised {type(e).__name__}: {e}"
                if not ok and not reason:
                    reason = getattr(ok, "reason", "") or "unsupported"
            if reason:
                reason = f"{op.target} unsupported by {backend_name} on {device.kind}: {reason}"
            cache[key] = reason
        if cache[key]:
            bad.append((op.name, cache[key]))
    return bad


def _is_float(dtype: str) -> bool:
    # integer index math (arange, embedding ids) runs anywhere; the device's dtypes list
    # the precisions it computes in
    return dtype.startswith(("float", "bfloat"))


def _check_placeable(problem: Problem, groups: GroupGraph, rejections: list[Rejection]) -> None:
    """Every group needs a device that runs all of its ops and can hold it."""
    allowed = problem.allowed()
    stuck = [i for i in range(problem.n) if not allowed[i].any()]
    lines = []
    for i in stuck:
        g = groups.groups[i]
        why: dict[str, list[str]] = {}
        members = set(g.nodes) | {g.name, "*"}
        for r in rejections:
            if r.node in members:
                why.setdefault(r.device, []).append(r.reason)
        lines.append(f"  group {g.name!r} ({len(g.nodes)} ops) can run on no device:")
        for dev, reasons in why.items():
            shown = "; ".join(dict.fromkeys(reasons[:3]))
            lines.append(f"    {dev}: {shown}" + (" ..." if len(reasons) > 3 else ""))
        op_lines = [
            groups.opgraph[r.node].source_line
            for r in rejections
            if r.node in g.nodes and groups.opgraph[r.node].source_line
        ]
        if op_lines:
            lines.append(f"    first offending source line: {op_lines[0]}")
    if lines:
        raise PlanInfeasible(
            "no placement runs every op:\n"
            + "\n".join(lines)
            + "\nWhat to do: pick a backend that supports these ops (backends=...), remove "
            "pins/exclusions that force them, or add a device that runs them."
        )
    for i in range(problem.n):
        # a group with one possible device that cannot hold it even alone can never fit
        options = np.flatnonzero(allowed[i])
        devs = {int(problem.place_device[p]) for p in options}
        if len(devs) != 1:
            continue
        d = devs.pop()
        need = min(problem.segment_memory(i, i + 1, int(p)) for p in options)
        if need > problem.capacity[d]:
            raise PlanInfeasible(
                f"group {problem.names[i]!r} can only run on {problem.devices[d]}, which lacks "
                f"memory: it needs {gib(need)} (weights + activations), the device has "
                f"{gib(problem.capacity[d])}. What to do: unpin it, stream its weights from host "
                "memory (a GPU with a host CPU), or use a device with more memory."
            )


def gib(x: float) -> str:
    return f"{x / 2**30:.2f} GiB" if x >= 2**28 else f"{x / 2**20:.1f} MiB"
