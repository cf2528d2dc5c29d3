"""Plan a generation: decode first, then prefill around the weights decode keeps resident.

Decode runs once per token, so its plan matters most: it is solved first, over the
placements resident / streamed / split (GPU with its host CPU) / any other device, by the
latency algorithm. Its resident groups then bind prefill: their weights are on the GPU
anyway (one copy per device serves both phases), and no other group may become resident
in prefill (that copy would have to live through decode too). Prefill then picks, for the
rest, streaming or another device; at a long prompt it streams, since the GPU's compute
hides the copies.

A layer's KV cache lives on the device that runs it in each phase; where the two differ,
the cache moves once per request after prefill (StateMove, priced by the cost model).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
from hetero.partitioner import host_dtype
from hetero.partitioner.algorithms.adapter import (
    BackendLookup,
    Context,
    build_problem,
    refine_for_support,
    resolve_backends,
)
from hetero.partitioner.algorithms.assemble import assemble
from hetero.partitioner.algorithms.latency import latency
from hetero.partitioner.algorithms.problem import INF, SPLIT, Placement, Problem, Solution
from hetero.partitioner.coarsen import GroupGraph
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment, HostPrecision, Objective
from hetero.partitioner.generation_plan import GenerationPlan, GroupChoice, StateMove
from hetero.partitioner.gpu_cpu_split import SplitDecision
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.host_dtype import HostDtype
from hetero.partitioner.phases import LMGraphs, Phase
from hetero.partitioner.plan import Plan
from hetero.partitioner.reprice import Pricing


def layer_depth(graph: OpGraph) -> int | None:
    """The module depth of the model's repeated blocks: the first level of the module stack
    of a state-writing op whose path ends in an index (`model.layers.3`)."""
    for op in graph:
        if not op.state_bytes:
            continue
        for depth, (path, _type) in enumerate(op.module_stack, start=1):
            if path.rsplit(".", 1)[-1].isdigit():
                return depth
        return len(op.module_stack) or None
    return None


# Generation's backend per device kind: GPU and CPU partitions take their weights and KV
# cache as inputs (Backend.holds_state; a GPU's run through torch.compile), NPU partitions
# are TVM's without state (the planner keeps cache updates off them).
GENERATION_BACKENDS = BackendAssignment((("cpu", "eager"), ("gpu", "inductor"), ("npu", "tvm")))


def lm_groups(
    graph: OpGraph,
    cluster: ClusterSpec,
    *,
    backends: BackendAssignment,
    exclude: Sequence[str],
    registry: BackendLookup,
) -> GroupGraph:
    """One group per decoder layer (and per piece around them), refined where a device runs
    only part of a layer: a layer whose cache no backend of some device can hold is split
    one level down, so its stateless parts (the MLP) may still go there."""
    depth = layer_depth(graph)
    groups = graph.coarsen(depth=depth, max_groups=1 << 20) if depth else graph.coarsen()
    groups = refine_for_support(
        groups, cluster, backends=backends, exclude=exclude, registry=registry, max_groups=1 << 20
    )
    stateless = [
        d
        for d in cluster.devices
        if d.name not in set(exclude)
        and not getattr(registry.get(backends.for_device(d)), "holds_state", False)
    ]
    if stateless:
        for g in list(groups.groups):
            if g.state_bytes and len(g.nodes) > 1:
                finer = groups.refine(g.name)
                if finer is not groups:
                    groups = finer
    return groups


def plan_generation(
    lm: LMGraphs,
    cluster: ClusterSpec,
    *,
    registry: BackendLookup,
    cost_model: CostModel | None = None,
    backends: BackendAssignment = GENERATION_BACKENDS,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    decode_placements: Mapping[str, str] | None = None,
    host_precision: HostPrecision | str = HostPrecision.MODEL,
) -> GenerationPlan:
    """Plans for both phases. `decode_placements` forces placements in decode (group or
    module path -> "resident" | "streamed" | "split" | a device name | "DEVICE:HOME", or
    several joined by "|"; `_force`), for comparisons."""
    cm = cost_model if cost_model is not None else CostModel.load(cluster=cluster)
    setup = _setup(
        lm, cluster, cm, registry, backends, exclude, HostPrecision.parse(host_precision)
    )
    common = setup.common
    dproblem, dctx = _decode_problem(lm, cluster, cm, setup, pins, decode_placements)
    dgroups, backend_notes, dtypes = dctx.groups, setup.notes, setup.dtypes
    dsol = latency(dproblem)
    decode = assemble(dproblem, dctx, dsol, objective=Objective.LATENCY)

    pgroups = lm_groups(lm.prefill, cluster, **common)
    pproblem, pctx = build_problem(
        pgroups, cluster, cm, pins=pins, notes=backend_notes, host_dtypes=dtypes, **common
    )
    pproblem = _keep_for_runtime(
        _bind_resident(pproblem, dproblem, dsol, dgroups, pgroups), cluster
    )
    psol = latency(pproblem)
    prefill = assemble(pproblem, pctx, psol, objective=Objective.LATENCY)

    moves = _moves(lm, prefill, decode, cluster, cm)
    notes = list(dict.fromkeys((*decode.notes, *prefill.notes)))
    kept = {d.name: runtime_reserve(d.memory) for d in cluster.devices if d.kind == "gpu"}
    if any(kept.values()):
        each = ", ".join(f"{name} {b / 2**20:.0f} MiB" for name, b in kept.items() if b)
        notes.append(
            f"GPU memory kept for the runtime's own allocations (cuBLAS workspaces, the CUDA "
            f"graph's pool), which the plan's tensors leave out: {each}"
        )
    if any(p.weights == SPLIT for p in decode.partitions):
        notes.append(
            "split: the GPU computes its share of each weight matrix's rows (streamed in) "
            "while the host CPU computes the rest from host memory; outputs meet on the GPU"
        )
    return GenerationPlan(
        prefill=prefill,
        decode=decode,
        batch=lm.batch,
        max_len=lm.max_len,
        moves=moves,
        choices=(
            (Phase.PREFILL.value, _choices(pproblem, pctx, psol)),
            (Phase.DECODE.value, _choices(dproblem, dctx, dsol)),
        ),
        notes=tuple(notes),
    )


@dataclasses.dataclass(frozen=True)
class _Setup:
    """What both phases' problems are built with: the resolved backends, the host CPUs'
    dtypes and the notes they bring."""

    common: dict
    notes: tuple[str, ...]
    dtypes: dict[str, str]
    precision: HostPrecision


def _setup(lm, cluster, cm, registry, backends, exclude, precision: HostPrecision) -> _Setup:
    resolved, backend_notes = resolve_backends(cluster, backends, registry)
    hosts = _host_dtypes(lm, cluster, cm, resolved, registry, exclude, precision)
    return _Setup(
        dict(backends=resolved, exclude=exclude, registry=registry),
        (*backend_notes, *(h.note() for h in hosts if h.priced_ms)),
        {h.device: h.dtype for h in hosts if h.dtype},
        precision,
    )


def _decode_problem(lm, cluster, cm, setup: _Setup, pins, decode_placements, fixed_splits=None):
    dgroups = lm_groups(lm.decode, cluster, **setup.common)
    dproblem, dctx = build_problem(
        dgroups, cluster, cm, pins=pins, split=True, overlap=True, notes=setup.notes,
        host_dtypes=setup.dtypes, fixed_splits=fixed_splits, host_precision=setup.precision,
        **setup.common,
    )  # fmt: skip
    dproblem = _keep_for_runtime(_reserve_prefill_slots(dproblem, cluster), cluster)
    if decode_placements:
        dproblem = _force(dproblem, dgroups, decode_placements)
    return dproblem, dctx


def decode_pricing(
    lm: LMGraphs,
    cluster: ClusterSpec,
    *,
    registry: BackendLookup,
    cost_model: CostModel,
    backends: BackendAssignment = GENERATION_BACKENDS,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    decode_placements: Mapping[str, str] | None = None,
    fixed_splits: Mapping[str, SplitDecision] | None = None,
    host_precision: HostPrecision | str = HostPrecision.MODEL,
) -> Pricing:
    """The decode problem `plan_generation` solves for these arguments, priced with
    `cost_model`: what a decode plan is re-priced with (`partitioner.reprice`) and its
    measured partitions are cut into terms with (`calibration.feedback.partition_runs`).
    `fixed_splits` (gpu_cpu_split.split_decisions of the plan): its split groups priced at
    the shares and trips that run, not chosen again at the new prices."""
    setup = _setup(
        lm, cluster, cost_model, registry, backends, exclude, HostPrecision.parse(host_precision)
    )
    problem, ctx = _decode_problem(
        lm, cluster, cost_model, setup, pins, decode_placements, fixed_splits
    )
    return Pricing(problem, ctx, Objective.LATENCY)


def _host_dtypes(
    lm: LMGraphs,
    cluster: ClusterSpec,
    cm: CostModel,
    backends: BackendAssignment,
    registry: BackendLookup,
    exclude: Sequence[str],
    precision: HostPrecision,
) -> list[HostDtype]:
    """Per host CPU that holds layers' state, the dtype its partitions compute in: one per
    device for both phases, since one copy of its weights and its caches serves both."""
    out = []
    excluded = {cluster.device(x).name for x in exclude}
    for d in cluster.devices:
        backend = backends.for_device(d)
        if d.name in excluded or not getattr(registry.get(backend), "holds_state", False):
            continue
        out.append(host_dtype.choose(list(lm.decode), d, cm, backend, precision))
    return out


def _label(problem: Problem, ctx: Context, gi: int, p: int) -> str:
    pl = problem.placements[p]
    dev = problem.devices[pl.device]
    if pl.weights == SPLIT:
        s = (ctx.splits or {}).get(gi)
        share = f" {s.fraction:.0%}/{1 - s.fraction:.0%} {s.cpu_dtype}" if s else ""
        if s is not None and s.whole:
            share += f" ({len(s.whole)} matrices streamed whole)"
        return f"{dev} split{share}"
    kind = ctx.cluster.device(dev).kind
    if kind != "gpu":
        dtype = ctx.host_dtypes.get(dev, "")
        return f"{dev} {dtype}" if dtype else dev
    return f"{dev} {pl.weights}"


def _choices(problem: Problem, ctx: Context, sol: Solution) -> tuple[GroupChoice, ...]:
    rows = []
    for gi, name in enumerate(problem.names):
        p = int(sol.assign[gi])
        others = sorted(
            (
                (_label(problem, ctx, gi, q), 1e3 * float(problem.unary[gi, q]))
                for q in range(problem.num_placements)
                if q != p and np.isfinite(problem.compute[gi, q])
            ),
            key=lambda x: x[1],
        )
        rows.append(
            GroupChoice(
                group=name,
                chosen=_label(problem, ctx, gi, p),
                predicted_ms=1e3 * float(problem.unary[gi, p]),
                alternatives=tuple(others),
                reason=_reason(problem, ctx, sol, gi, others),
            )
        )
    return tuple(rows)


def _reason(problem: Problem, ctx: Context, sol: Solution, gi: int, others) -> str:
    p = int(sol.assign[gi])
    pl = problem.placements[p]
    if pl.weights == SPLIT:
        s = (ctx.splits or {}).get(gi)
        if s is not None:
            return (
                f"link {1e3 * s.link_s:.3f} ms for {s.gpu_bytes / 2**20:.0f} MiB while the CPU "
                f"reads {s.cpu_bytes / 2**20:.0f} MiB in {1e3 * s.cpu_s:.3f} ms"
            )
    faster = [
        q
        for q in range(problem.num_placements)
        if q != p and problem.unary[gi, q] + 1e-12 < problem.unary[gi, p]
    ]
    if not faster:
        return ""
    trial = None
    for q in sorted(faster, key=lambda q: problem.unary[gi, q]):
        candidate = sol.assign.copy()
        candidate[gi] = q
        if not problem.overflow(candidate).any():  # the fastest that fits is the one shown
            trial = candidate
            break
    if trial is None:
        return "memory: a faster placement does not fit"
    if problem.overlapped:
        slower = 1e3 * (problem.latency(trial) - problem.latency(sol.assign))
        return (
            f"overlap: {_label(problem, ctx, gi, int(trial[gi]))} alone is faster, but the step "
            f"takes {slower:+.2f} ms (the link streams other layers' weights while this one runs)"
        )
    return "transfers: its neighbours run here"


def _force(problem: Problem, groups: GroupGraph, forced: Mapping[str, str]) -> Problem:
    """Only the placements named for the groups under each key (the group, or a module path
    whose groups sit below it: "model.layers.1" is not "model.layers.10"; a key ending in
    "." names a prefix as it is). A placement is a weight home ("resident", "streamed",
    "split"), a device name, or "DEVICE:HOME" for both ("node0/gpu:resident": resident on
    that GPU, where "resident" alone also takes the CPU, whose weights are resident too);
    "a|b" allows either. A key that names no group, or a group none of whose placements is
    allowed, is a ConfigError: a comparison must not measure another plan than it names."""
    compute = problem.compute.copy()
    for key, want in forced.items():
        # (device or "", home or device name) per token: "node0/gpu:resident" -> both
        wants = [w.strip().rpartition(":")[::2] for w in want.split("|") if w.strip()]
        hit = [i for i, g in enumerate(groups.groups) if _under(g.name, key)]
        if not hit:
            raise ConfigError(
                f"decode_placements: {key!r} names no group of this model's decode step; "
                f"groups are module paths such as {groups.groups[-1].name!r}"
            )
        keep = [q for q, pl in enumerate(problem.placements) if _allowed(problem, pl, wants)]
        mask = np.full(problem.num_placements, True)
        mask[keep] = False
        for i in hit:
            if not np.isfinite(compute[i, keep]).any():
                able = sorted(
                    _placement_name(problem, pl)
                    for q, pl in enumerate(problem.placements)
                    if np.isfinite(compute[i, q])
                )
                raise ConfigError(
                    f"decode_placements: {key!r} -> {want!r}: group "
                    f"{groups.groups[i].name!r} cannot be placed so; it can be: "
                    f"{', '.join(able) or 'nowhere'}"
                )
            compute[i, mask] = INF
    return dataclasses.replace(problem, compute=compute)


def _under(name: str, key: str) -> bool:
    return name == key or name.startswith(key if key.endswith(".") else key + ".")


def _allowed(problem: Problem, pl: Placement, wants: Sequence[tuple[str, str]]) -> bool:
    device = problem.devices[pl.device]
    return any(
        (where == device and home == pl.weights) if where else home in (pl.weights, device)
        for where, home in wants
    )


def _placement_name(problem: Problem, pl: Placement) -> str:
    return f"{problem.devices[pl.device]}:{pl.weights}"


def _reserve_prefill_slots(problem: Problem, cluster: ClusterSpec) -> Problem:
    """Decode shares its GPU's two streaming slots with prefill, which streams whole
    layers: while any layer is not resident there, the slots hold the largest one."""
    floor = np.zeros(problem.num_devices)
    largest = float(problem.param_bytes.max()) if problem.n else 0.0
    for q in range(problem.num_placements):
        if problem.place_streamed[q]:
            floor[problem.placements[q].device] = 2 * largest
    return dataclasses.replace(problem, slot_floor=floor)


# GPU memory a generation's runtime allocates beside the plan's tensors: cuBLAS/cuBLASLt
# workspaces (32 MiB per stream that multiplies on Hopper: the compute stream, a CUDA graph's
# capture stream) and the graph's pool. Measured on an H200 under a 4 GiB cap: peaks
# 0.12-0.18 GiB above the plan's memory (llm_generate.md, runs 7 and 10), and 42 MB over the
# cap with 205 MiB kept (runs 11 and 13: the share below held the kept memory to 5% of the
# cap, whatever this constant said), i.e. ~0.24 GiB. A tiny cap (tests, emulated GPUs) keeps
# most of itself.
RUNTIME_RESERVE = 320 << 20
_RESERVE_SHARE = 0.10


def runtime_reserve(capacity: float | None) -> float:
    """Bytes of a GPU of `capacity` (None: unbounded) that the plan leaves to the runtime."""
    if not capacity or not np.isfinite(capacity):
        return 0.0
    return min(RUNTIME_RESERVE, _RESERVE_SHARE * capacity)


def _keep_for_runtime(problem: Problem, cluster: ClusterSpec) -> Problem:
    capacity = problem.capacity.copy()
    for d, name in enumerate(problem.devices):
        if cluster.device(name).kind == "gpu":
            capacity[d] -= runtime_reserve(capacity[d])
    return dataclasses.replace(problem, capacity=capacity)


def _bind_resident(
    pproblem: Problem, dproblem: Problem, dsol: Solution, dgroups: GroupGraph, pgroups: GroupGraph
) -> Problem:
    """Prefill keeps exactly decode's resident set on each GPU-like device with streaming:
    those weights are there anyway (streaming them would spend the link for nothing), and
    no other group may become resident (that copy would have to live through decode)."""
    resident_in_decode: dict[str, str] = {}
    for gi, g in enumerate(dgroups.groups):
        p = int(dsol.assign[gi])
        if not dproblem.place_streamed[p]:
            resident_in_decode[g.name] = dproblem.devices[dproblem.placements[p].device]
    streams = {
        pproblem.placements[q].device
        for q in range(pproblem.num_placements)
        if pproblem.place_streamed[q]
    }
    compute = pproblem.compute.copy()
    for gi, g in enumerate(pgroups.groups):
        dev = resident_in_decode.get(g.name)
        if not g.param_bytes:
            continue
        for q, pl in enumerate(pproblem.placements):
            here = pproblem.devices[pl.device]
            keep = not pproblem.place_streamed[q] and here == dev
            if dev in {pproblem.devices[i] for i in streams} and not keep:
                compute[gi, q] = INF  # its resident copy on that GPU serves prefill too
            elif pl.device in streams and not pproblem.place_streamed[q] and dev != here:
                compute[gi, q] = INF  # would be a second resident copy
    return dataclasses.replace(pproblem, compute=compute)


def _moves(
    lm: LMGraphs, prefill: Plan, decode: Plan, cluster: ClusterSpec, cm: CostModel
) -> tuple[StateMove, ...]:
    def homes(plan: Plan, graph: OpGraph) -> dict[str, str]:
        where = {n: p.device for p in plan.partitions for n in p.nodes}
        out = {}
        for op in graph:
            if op.state_bytes:
                for s in op.params:
                    if s in graph.state:
                        out[s] = where[op.name]
        return out

    pre, dec = homes(prefill, lm.prefill), homes(decode, lm.decode)
    size = {s.name: s.nbytes for s in lm.state}
    by_pair: dict[tuple[str, str], list[str]] = {}
    for s, dst in dec.items():
        src = pre.get(s, dst)
        if src != dst:
            by_pair.setdefault((src, dst), []).append(s)
    return tuple(
        StateMove(
            state=tuple(names),
            src=src,
            dst=dst,
            bytes=sum(size[n] for n in names),
            predicted_ms=1e3 * cm.transfer_time(cluster, src, dst, sum(size[n] for n in names)),
        )
        for (src, dst), names in sorted(by_pair.items())
    )
