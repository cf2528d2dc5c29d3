"""The default planner ("auto"): symmetry first, stages over classes and hosts, exact search
with what is left of a time budget, the best plan found and whether it is proven optimal.

1. Symmetry (`symmetry.py`): identical devices form classes, identical hosts types; the cost
   model prices representatives only (`Symmetry.reduced`), each distinct block once
   (`pricing.py`), and asks backends about each distinct op once.
2. Hierarchy (`stages.py`): contiguous stages over host groups, then over the instances of
   each host, by a DP over counts; "throughput" is exact for plans that visit each host
   once, "latency" minimises the stages' summed time, then a local search over the devices
   used (and one spare of each class per host) trades groups between them.
3. Small clusters (at most `FLAT_DEVICES` devices) also run the earlier algorithms
   (`latency.py`, `throughput.py`) and keep whichever result is best, so "auto" is never
   worse there; an exact search (`branch.py` for latency, the flat pipeline DP for
   throughput) runs while the budget lasts and proves optimality when it finishes.
4. Names last: the plan's stages are put on real devices (`Symmetry.names`) and the Problem
   over those devices is expanded from the representatives' numbers (`tiers.expand`).

"Optimal" is about the planner's model (`Problem.latency` / `Problem.throughput` under the
memory limits), the numbers `Plan.predicted_ms` is assembled from.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.algorithms.adapter import (
    BackendLookup,
    Context,
    build_problem,
    refine_for_support,
    resolve_backends,
    with_fusing,
)
from hetero.partitioner.algorithms.assemble import assemble
from hetero.partitioner.algorithms.branch import branch_and_bound
from hetero.partitioner.algorithms.latency import _local_search
from hetero.partitioner.algorithms.latency import latency as cut_latency
from hetero.partitioner.algorithms.pricing import PricedOnce
from hetero.partitioner.algorithms.problem import INF, Problem, Solution
from hetero.partitioner.algorithms.stages import (
    bottleneck_bound,
    pipeline,
    slots_of,
    to_assignment,
)
from hetero.partitioner.algorithms.symmetry import Slot, Symmetry, analyse
from hetero.partitioner.algorithms.throughput import throughput as flat_pipeline
from hetero.partitioner.algorithms.tiers import (
    Tiers,
    expand,
    from_problem,
    placement_index,
    placement_key,
)
from hetero.partitioner.coarsen import GroupGraph
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment, Objective
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.progress import Report as Progress

FLAT_DEVICES = 4  # up to this many devices the earlier algorithms run too
EXACT_DEFAULT_S = 1.0  # exact search time when no budget is given
EXACT_MAX_GROUPS = 40  # branch and bound beyond this many groups would only burn the budget
EXACT_MAX_DEVICES = 16  # ... or this many devices
# the flat pipeline DP's work, about (groups x placements)^2 x 2^devices: ~1 s in Python
FLAT_DP_WORK = 2_000_000
SPLIT_SHARE = 1 / 8  # a group holding more of the weights than this is split when it can be
MAX_SCALE_GROUPS = 1024  # coarsen_for_scale goes no deeper than this many groups
MAX_HOST_STATES = 4096  # combinations of hosts used per type the stage DP may track


@dataclass(frozen=True)
class Found:
    """One candidate plan: an assignment on a Problem over the devices it may use."""

    assign: np.ndarray
    problem: Problem
    method: str
    value: float  # Problem.objective (inf: not a valid pipeline / not allowed)
    over: float  # bytes over capacity, summed over devices

    @classmethod
    def of(cls, problem: Problem, assign: np.ndarray, method: str, objective: Objective) -> Found:
        allowed = np.isfinite(problem.compute[np.arange(problem.n), assign]).all()
        value = seconds(problem, assign, objective) if allowed else INF
        return cls(assign, problem, method, value, float(problem.overflow(assign).sum()))

    def key(self) -> tuple[float, float]:
        return (self.over, self.value)


class _Clock:
    """The time budget and the progress callback (called at most ten times a second)."""

    def __init__(self, budget: float | None, progress: Progress | None) -> None:
        self.start = time.perf_counter()
        self.budget = budget
        self.progress = progress
        self.phase = "planning"
        self._last = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def exact_deadline(self) -> float:
        if self.budget is None:
            return time.perf_counter() + EXACT_DEFAULT_S
        return self.start + self.budget

    def enter(self, phase: str) -> None:
        self.phase = phase
        self.tick(force=True)

    def tick(self, _steps: int = 0, *, force: bool = False) -> None:
        if self.progress is None:
            return
        now = time.perf_counter()
        if force or now - self._last >= 0.1:
            self._last = now
            self.progress(self.phase, now - self.start, self.budget or 0.0)


def coarsen_for_scale(graph: OpGraph, max_groups: int = 64) -> GroupGraph:
    """`graph.coarsen()`, then one module level deeper while a group that the next level
    would split holds more than SPLIT_SHARE of the weights (a 80-layer model's `model`
    module holds them all: its layers become groups, not one)."""
    groups = graph.coarsen(max_groups=max_groups)
    total = graph.param_bytes or 1
    depth = max((g.depth for g in groups), default=0)
    deepest = max((len(n.module_stack) for n in graph), default=0)
    while depth < deepest:
        finer = graph.coarsen(depth=depth + 1)
        if len(finer) > MAX_SCALE_GROUPS:
            break
        split = any(
            g.param_bytes > SPLIT_SHARE * total
            and len(finer[finer.group_of[g.nodes[0]]].nodes) < len(g.nodes)
            for g in groups
        )
        if not split:
            break
        groups, depth = finer, depth + 1
    return groups


def seconds(problem: Problem, assign: np.ndarray, objective: Objective) -> float:
    """What `objective` measures of `assign`: one request, or one microbatch of a pipeline."""
    return problem.throughput(assign) if objective.pipelined else problem.latency(assign)


def origin_of(cluster: ClusterSpec) -> str:
    """The caller's device, as `adapter.build_problem` picks it: the first CPU."""
    return next((d for d in cluster.devices if d.kind == "cpu"), cluster.devices[0]).name


def plan_auto(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: Objective,
    *,
    registry: BackendLookup,
    backends: BackendAssignment = BackendAssignment(),
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    cost_model: CostModel | None = None,
    groups: GroupGraph | None = None,
    time_budget_s: float | None = None,
    progress: Progress | None = None,
) -> Plan:
    """The plan `plan()` returns by default (see the module docstring); arguments as there."""
    clock = _Clock(time_budget_s, progress)
    clock.enter("device classes")
    cost_model = cost_model if cost_model is not None else CostModel.load(cluster=cluster)
    resolved, backend_notes = resolve_backends(cluster, backends, registry)
    # told once which backends fuse, so that build_problem leaves the memoising wrapper as is
    used = sorted({resolved.for_device(d) for d in cluster.devices})
    cost_model = with_fusing(cost_model, used, registry)
    origin = origin_of(cluster)
    excluded = [cluster.device(x).name for x in exclude]
    apart = set(excluded) | {cluster.device(d).name for d in (pins or {}).values()}
    if cost_model.profile is not None:  # a measured link belongs to two named devices
        apart |= {end for lp in cost_model.profile.links for end in (lp.a, lp.b)}
    sym = analyse(cluster, resolved, origin=origin, distinct=apart)
    small, rslots = sym.reduced()
    flat = len(small.devices) == len(cluster.devices)

    clock.enter("pricing")
    if groups is None:
        groups = refine_for_support(
            coarsen_for_scale(graph), small, backends=resolved, exclude=excluded, registry=registry
        )
    priced = PricedOnce(cost_model)
    problem_r, ctx_r = build_problem(
        groups,
        small,
        priced,
        backends=resolved,
        pins=pins,
        exclude=excluded,
        microbatches=microbatches if objective.pipelined else 1,
        registry=registry,
        notes=backend_notes,
    )
    slots_r = [rslots[name] for name in problem_r.devices]
    best, optimal, notes = solve(problem_r, slots_r, sym, objective, flat=flat, clock=clock)

    ctx = Context(
        groups=groups,
        cluster=cluster,
        cost_model=cost_model,
        backends=resolved,
        scale=ctx_r.scale,
        rejections=ctx_r.rejections,
        notes=ctx_r.notes,
    )
    structure = sym.describe() if sym.regular else f"no symmetry used ({sym.why})"
    notes = [
        f"planned over {structure}: {len(groups)} groups, priced {priced.misses} times "
        f"({priced.hits} repeats reused), {clock.elapsed():.2f} s",
        *notes,
    ]
    solution = Solution(best.assign, best.value, "auto", tuple(notes))
    clock.enter("assembling")
    plan = assemble(best.problem, ctx, solution, objective=objective, microbatches=microbatches)
    return replace(plan, method=best.method, optimal=optimal)


def solve(
    problem_r: Problem,
    slots_r: Sequence[Slot],
    sym: Symmetry,
    objective: Objective,
    *,
    flat: bool,
    clock: _Clock | None = None,
) -> tuple[Found, bool, list[str]]:
    """The best plan found for `problem_r` (over representatives with slots `slots_r`; the
    whole cluster when `flat`), whether it is proven optimal, and notes."""
    clock = clock if clock is not None else _Clock(None, None)
    caps = _host_caps(sym, problem_r, objective)
    dropped = 0
    while math.prod(c + 1 for c in caps) > MAX_HOST_STATES:
        # hosts that are all different (no uniform network) multiply the DP's states: plan
        # over the first ones (the origin's first)
        t = max(t for t, c in enumerate(caps) if c and t != sym.slots[sym.origin].host_type)
        dropped += caps[t]
        caps[t] = 0
    tiers = from_problem(problem_r, slots_r, sym.counts, caps)
    best, optimal, notes = _Search(
        sym, problem_r, list(slots_r), tiers, objective, clock, flat=flat
    ).run()
    if dropped:
        notes.append(f"{dropped} host(s) left out: hosts that differ are tracked one by one")
    return best, optimal, notes


def _gap(value: float, bound: float, how: str) -> str:
    return (
        f"planner's objective (what `optimal` is about) {1e3 * value:.3f} ms, "
        f"{100 * (value / bound - 1):.2f}% above a lower bound of {1e3 * bound:.3f} ms ({how})"
    )


def _flat_dp_work(problem: Problem) -> float:
    return float(problem.n * problem.num_placements) ** 2 * 2.0**problem.num_devices


def _host_caps(sym: Symmetry, problem: Problem, objective: Objective) -> list[int]:
    """Hosts per type worth considering: a pipeline never uses more hosts than groups; one
    request (latency) gains from more hosts only their memory, so enough to hold all the
    weights resident, and one more."""
    caps = [min(len(hosts), max(problem.n, 1)) for hosts in sym.host_types]
    if objective.pipelined:
        return caps
    per_host = []
    for t in range(sym.num_types):
        cap = 0.0
        for c, count in enumerate(sym.counts[t]):
            if count:
                name = sym.names[Slot(c, t, 0, 0)]
                if name in problem.devices:
                    cap += count * problem.capacity[problem.devices.index(name)]
        per_host.append(cap)
    need = float(problem.param_bytes.sum() + problem.act_bytes.max(initial=0.0))
    have = sum(per_host[t] for t in range(sym.num_types) if len(sym.host_types[t]) == 1)
    extra = max(per_host, default=0.0)
    more = 0 if have >= need or extra <= 0 else math.ceil((need - have) / extra)
    return [min(c, (1 if len(sym.host_types[t]) == 1 else more + 1)) for t, c in enumerate(caps)]


class _Search:
    """The candidates of one plan() call and the choice among them."""

    def __init__(
        self,
        sym: Symmetry,
        problem_r: Problem,
        slots_r: list[Slot],
        tiers: Tiers,
        objective: Objective,
        clock: _Clock,
        *,
        flat: bool,
    ) -> None:
        self.sym = sym
        self.problem_r = problem_r
        self.slots_r = slots_r
        self.tiers = tiers
        self.objective = objective
        self.clock = clock
        self.flat = flat
        self.notes: list[str] = []

    # ---- the Problem a set of devices plans on ----------------------------------------------
    def over(self, names: set[str]) -> tuple[Problem, dict[Slot, int]]:
        """The Problem over `names` (+ the origin), in cluster order, and slot -> index."""
        if self.flat:
            return self.problem_r, {s: i for i, s in enumerate(self.slots_r)}
        names = names | {self.sym.origin}
        ordered = [name for name in self.sym.slots if name in names]  # cluster order
        targets = [(name, self.sym.slots[name]) for name in ordered]
        problem = expand(self.problem_r, self.slots_r, targets, self.sym.origin)
        return problem, {s: i for i, (_, s) in enumerate(targets)}

    def spares(self, used: set[str]) -> set[str]:
        """One unused instance of each class on each host in use: room for local moves."""
        out: set[str] = set()
        hosts = {(self.sym.slots[n].host_type, self.sym.slots[n].host) for n in used}
        for t, h in hosts:
            for c, count in enumerate(self.sym.counts[t]):
                for i in range(count):
                    name = self.sym.names[Slot(c, t, h, i)]
                    if name not in used:
                        out.add(name)
                        break
        return out

    # ---- the candidates ----------------------------------------------------------------------
    def run(self) -> tuple[Found, bool, list[str]]:
        found: list[Found] = []
        optimal = False
        flat_ran = self.flat and len(self.sym.slots) <= FLAT_DEVICES
        if flat_ran:
            self.clock.enter("min-cut / pipeline DP (flat)")
            found.append(self._flat())
            if self.objective.pipelined:
                optimal = True  # the flat pipeline DP is exact for its model
        self.clock.enter("stages over device classes and hosts")
        staged = self._stages()
        if staged is not None:
            found.append(staged)
        if not flat_ran and not any(f.over == 0 and np.isfinite(f.value) for f in found):
            # no stage plan fits (a device runs only part of the model and a pipeline cannot
            # come back to it): the earlier search on the representatives, which can
            self.clock.enter("min-cut / pipeline DP on representatives")
            fallback = self._flat(small=True)
            if fallback is not None:
                found.append(fallback)
        if not found:  # nothing fits: assemble() says which device lacks what
            none = Found.of(
                self.problem_r, np.zeros(self.problem_r.n, dtype=int), "none", self.objective
            )
            return replace(none, value=INF), False, self.notes
        best = self._pick(found)
        if self.objective.pipelined:
            if not optimal:
                best, optimal = self._exact_pipeline(best)
        else:
            self.clock.enter("exact search (branch and bound)")
            best, optimal = self._exact_latency(best)
        return best, optimal, self.notes

    def _pick(self, found: list[Found]) -> Found:
        best = found[0]
        for f in found[1:]:  # a later candidate must be strictly better (stable plans)
            if f.key()[0] < best.key()[0] or (
                f.key()[0] == best.key()[0] and f.value < best.value * (1 - 1e-9) - 1e-15
            ):
                best = f
        return best

    def _flat(self, *, small: bool = False) -> Found | None:
        """Today's algorithm on the Problem over the representatives (all devices when
        flat); `small`: only when it is cheap there (the pipeline DP is exponential)."""
        p = self.problem_r
        if self.objective.pipelined:
            if small and _flat_dp_work(p) > FLAT_DP_WORK:
                return None
            sol = flat_pipeline(p)
            return Found.of(p, sol.assign, "pipeline DP over devices", self.objective)
        sol = cut_latency(p)
        return Found.of(p, sol.assign, "min-cut / list scheduling + local search", self.objective)

    def _stages(self) -> Found | None:
        tiers = self.tiers
        plan = pipeline(tiers, self.objective, progress=self.clock.tick)
        if plan is None:
            return None
        slots = [s for _, _, s in slots_of(plan, tiers)]
        used = {self.sym.names[s] for s in slots}
        multi = sum(int(h) for h in tiers.hosts) > 1
        where = "device classes and host groups" if multi else "device classes"
        self.notes.append(
            f"stage DP over {where}: {len(plan.stages)} stage(s), {plan.states} states"
        )
        if self.objective.pipelined:
            problem, device_of = self.over(used)
            assign = to_assignment(plan, tiers, device_of, placement_index(problem))
            return Found.of(problem, assign, f"stage DP over {where}", self.objective)
        problem, device_of = self.over(used | self.spares(used))
        assign = to_assignment(plan, tiers, device_of, placement_index(problem))
        self.clock.enter("local search")
        polished = _local_search(problem, assign, problem.allowed(), trades=False)
        return Found.of(problem, polished, f"stage DP over {where} + local search", self.objective)

    # ---- optimality ---------------------------------------------------------------------------
    def _complete(self) -> set[str] | None:
        """Devices enough to hold a relabelling of every plan (at most n hosts per type and n
        instances per class and host); None when that is too many for exact search."""
        n = self.tiers.n
        names = {name for name, s in self.sym.slots.items() if s.host < n and s.instance < n}
        return names if len(names) <= EXACT_MAX_DEVICES else None

    def _exact_pipeline(self, best: Found) -> tuple[Found, bool]:
        """(best, proven): the stage DP is exact on one host; across hosts it is proven by a
        lower bound it meets, or by the flat pipeline DP where that is small enough (which
        also replaces it when a plan that revisits a host is faster)."""
        if sum(int(h) for h in self.tiers.hosts) <= 1:
            return best, True
        bound = bottleneck_bound(self.tiers)
        if best.over == 0 and best.value <= bound * (1 + 1e-9) + 1e-15:
            return best, True
        complete = self._complete()
        if complete is not None:
            problem, _ = self.over(complete)
            if _flat_dp_work(problem) <= FLAT_DP_WORK:
                self.clock.enter("exact search (pipeline DP over devices)")
                sol = flat_pipeline(problem)
                exact = Found.of(problem, sol.assign, "pipeline DP over devices", self.objective)
                return self._pick([best, exact]), True
        if np.isfinite(bound) and best.value > 0:
            self.notes.append(
                _gap(best.value, bound, "instances unlimited, every move at its cheapest link")
            )
        return best, False

    def _latency_bound(self, best: Found) -> None:
        """Note how far `best` is from a lower bound: every group at its cheapest placement,
        nothing transferred, memory ignored."""
        p = best.problem
        bound = float(np.where(p.allowed(), p.base, INF).min(axis=1).sum())
        if best.over == 0 and np.isfinite(best.value) and bound > 0:
            self.notes.append(_gap(best.value, bound, "each group at its cheapest placement"))

    def _exact_latency(self, best: Found) -> tuple[Found, bool]:
        complete = self._complete()
        if complete is None or self.tiers.n > EXACT_MAX_GROUPS:
            self._latency_bound(best)
            return best, False
        problem, _ = self.over(complete)
        start = self._relabel(best, problem)
        result = branch_and_bound(problem, incumbent=start, deadline=self.clock.exact_deadline())
        if result.assign is not None:
            exact = Found.of(problem, result.assign, "branch and bound", self.objective)
            if exact.key() < best.key() and exact.value < best.value * (1 - 1e-9) - 1e-15:
                best = exact
        if result.proven and best.method != "branch and bound":
            best = replace(best, method=f"{best.method}, proven by branch and bound")
        if not result.proven:
            self.notes.append(f"exact search stopped at the time budget after {result.nodes} nodes")
            self._latency_bound(best)
        return best, result.proven

    def _relabel(self, found: Found, problem: Problem) -> np.ndarray | None:
        """`found`'s assignment on `problem` (same devices by name), or None."""
        index = {name: i for i, name in enumerate(problem.devices)}
        keys = placement_index(problem)
        out = np.zeros(found.problem.n, dtype=int)
        for i, p in enumerate(found.assign):
            pl = found.problem.placements[int(p)]
            name = found.problem.devices[pl.device]
            if name not in index:
                return None
            out[i] = keys[(index[name], placement_key(pl))]
        return out
