"""Partition algorithms: one registry by name, and `plan()`, the entry point.

    auto        the default: device classes and host types, stages by a DP over counts,
                the algorithms below on small clusters, exact search within a time budget
                (auto.py; it plans from the graph, so it is not in the registry)
    latency     min-cut (2 devices, exact) / list scheduling + expansion moves (more), then
                local refinement; memory through Lagrangian penalties
    throughput  contiguous pipeline stages by dynamic programming (exact for its model)
    exhaustive  every assignment (or pipeline); ground truth for tests on small graphs

An algorithm registers one solver per `Objective` it optimises.

Each algorithm is a pure function over a `Problem` (cost arrays); `adapter.build_problem`
turns (GroupGraph, ClusterSpec, CostModel) into one and `assemble.assemble` turns the
solution into a Plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError, PlanInfeasible
from hetero.partitioner.algorithms.adapter import (
    BackendLookup,
    problem_for,
    refine_for_support,
    unsupported_ops,
)
from hetero.partitioner.algorithms.assemble import assemble
from hetero.partitioner.algorithms.auto import plan_auto
from hetero.partitioner.algorithms.exhaustive import exhaustive, exhaustive_pipelines
from hetero.partitioner.algorithms.latency import latency
from hetero.partitioner.algorithms.problem import Placement, Problem, Solution
from hetero.partitioner.algorithms.throughput import throughput
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import FALLBACK_BACKEND, BackendAssignment, Objective
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.progress import Report as Progress
from hetero.partitioner.progress import progress_bar

# The default planner, for every objective; not in the registry (it plans from the graph,
# not from one Problem)
AUTO = "auto"


@dataclass(frozen=True)
class Algorithm:
    """A partition algorithm: one solver per objective it optimises."""

    name: str
    solvers: Mapping[Objective, Callable[[Problem], Solution]]
    summary: str
    exact: bool = False  # its solution is optimal for the planner's model (Plan.optimal)

    @property
    def objectives(self) -> tuple[Objective, ...]:
        return tuple(self.solvers)

    def solve(self, problem: Problem, objective: Objective) -> Solution:
        solver = self.solvers.get(objective)
        if solver is None:
            raise ConfigError(
                f"algorithm {self.name!r} optimises {', '.join(map(str, self.objectives))}, "
                f"not {objective}"
            )
        return solver(problem)


class AlgorithmRegistry:
    """Algorithms by name; a duplicate is an error, an unknown name lists the known ones."""

    def __init__(self, algorithms: Sequence[Algorithm] = ()) -> None:
        self._by_name: dict[str, Algorithm] = {}
        for a in algorithms:
            self.register(a)

    def register(self, algorithm: Algorithm) -> None:
        if algorithm.name in self._by_name:
            raise ConfigError(f"a partition algorithm named {algorithm.name!r} already exists")
        self._by_name[algorithm.name] = algorithm

    def get(self, name: str) -> Algorithm:
        if name not in self._by_name:
            raise ConfigError(
                f"no partition algorithm {name!r}; known: {', '.join(sorted(self._by_name))}"
            )
        return self._by_name[name]

    def names(self) -> list[str]:
        return sorted(self._by_name)


def default_algorithms() -> AlgorithmRegistry:
    L, T = Objective.LATENCY, Objective.THROUGHPUT
    return AlgorithmRegistry(
        [
            Algorithm("latency", {L: latency}, "min-cut / list scheduling + refinement"),
            Algorithm("throughput", {T: throughput}, "pipeline stages by DP", exact=True),
            Algorithm(
                "exhaustive",
                {L: exhaustive, T: exhaustive_pipelines},
                "every assignment (small graphs)",
                exact=True,
            ),
        ]
    )


def plan(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: Objective = Objective.LATENCY,
    *,
    registry: BackendLookup,
    backends: BackendAssignment = BackendAssignment(),
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    cost_model: CostModel | None = None,
    algorithm: str | None = None,
    groups=None,
    time_budget_s: float | None = None,
    progress: bool | Progress | None = None,
) -> Plan:
    """Partition `graph` over `cluster` (typed decisions: `hetero.plan` parses strings).

    registry: the backend registry asked which ops each backend supports (the same object
    the compile and the runtime use). backends: which backend each device kind asks for
    (one that is unavailable here falls back to eager, with a note). pins: module path (or
    op name) -> device. exclude: devices not to use. microbatches: for a pipelined
    objective, the batch is cut into this many microbatches. groups: a GroupGraph to plan
    over instead of `graph.coarsen()` refined where a device runs a group only in part.
    algorithm: None or "auto" (the default: see `auto.py`), or one of the registry's.
    time_budget_s: seconds "auto" may spend (its exact search stops there; it returns the
    best plan found and `Plan.optimal` says whether it is proven). progress: True for a
    progress bar on the terminal, or a callable (phase, seconds spent, budget).
    """
    if time_budget_s is not None and time_budget_s <= 0:
        raise ConfigError(f"time_budget_s must be positive, got {time_budget_s}")

    def attempt(assignment: BackendAssignment) -> Plan:
        return _plan(
            graph, cluster, objective, registry=registry, backends=assignment, pins=pins,
            exclude=exclude, microbatches=microbatches, cost_model=cost_model,
            algorithm=algorithm, groups=groups, time_budget_s=time_budget_s, progress=progress,
        )  # fmt: skip

    try:
        return attempt(backends)
    except PlanInfeasible as first:
        # A kind the person did not pin plans with eager where its backend leaves some group
        # on no device, one kind at a time in the cluster's order: transformers' Mixtral calls
        # `transformers::grouped_mm_fallback`, which TVM's importer cannot convert. The
        # measured choice (runtime/choice.py) still tries the kind's other backends on each
        # partition they run.
        assignment, said = backends, []
        for kind in dict.fromkeys(d.kind for d in cluster.devices):
            asked = assignment.for_kind(kind)
            if kind not in _FALLS_BACK or assignment.is_pinned(kind) or asked == FALLBACK_BACKEND:
                continue
            device = next(d for d in cluster.devices if d.kind == kind)
            refused = _cannot(graph, device, asked, registry)
            if not refused:  # infeasible for another reason (memory, pins): eager won't help
                continue
            assignment = assignment.with_kind(kind, FALLBACK_BACKEND)
            said.append(
                f"{kind}: {asked} cannot run every op of this model "
                f"({refused}); planned with {FALLBACK_BACKEND}, "
                f"and the measured choice still tries {asked} on each partition it runs (pin "
                f"backends={{{kind!r}: {asked!r}}} to be refused instead)"
            )
            try:
                planned = attempt(assignment)
            except PlanInfeasible:
                continue
            return replace(planned, notes=(*planned.notes, *said))
        raise first


# Kinds whose eager backend is the device's own PyTorch: an NPU's limits are its hardware's
# (an emulated one would run eager and say nothing of the real one).
_FALLS_BACK = ("cpu", "gpu")


def _cannot(graph: OpGraph, device, backend: str, registry: BackendLookup) -> str:
    """The first few ops `backend` refuses on `device`, by target ("": none, or a backend
    this registry does not know, which planning already replaced with eager)."""
    if backend not in registry:
        return ""
    refused = dict.fromkeys(
        str(graph[name].target)
        for name, why in unsupported_ops(list(graph), device, backend, registry, {})
        if f"unsupported by {backend} " in why
    )
    return ", ".join(list(refused)[:3]) + (" ..." if len(refused) > 3 else "")


def _plan(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: Objective,
    *,
    registry: BackendLookup,
    backends: BackendAssignment,
    pins: Mapping[str, str] | None,
    exclude: Sequence[str],
    microbatches: int,
    cost_model: CostModel | None,
    algorithm: str | None,
    groups,
    time_budget_s: float | None,
    progress: bool | Progress | None,
) -> Plan:
    if algorithm in (None, AUTO):
        with progress_bar(progress) as report:
            return plan_auto(
                graph,
                cluster,
                objective,
                registry=registry,
                backends=backends,
                pins=pins,
                exclude=exclude,
                microbatches=microbatches,
                cost_model=cost_model,
                groups=groups,
                time_budget_s=time_budget_s,
                progress=report,
            )
    registered = default_algorithms()
    if algorithm not in registered.names():
        known = ", ".join([AUTO, *registered.names()])
        raise ConfigError(f"no partition algorithm {algorithm!r}; known: {known}")
    algo = registered.get(algorithm)
    if objective not in algo.objectives:
        raise ConfigError(
            f"algorithm {algo.name!r} optimises {', '.join(map(str, algo.objectives))}, "
            f"not {objective}"
        )
    cost_model = cost_model if cost_model is not None else CostModel.load(cluster=cluster)
    problem, ctx = problem_for(
        graph,
        cluster,
        objective,
        registry=registry,
        cost_model=cost_model,
        backends=backends,
        pins=pins,
        exclude=exclude,
        microbatches=microbatches,
        groups=groups,
    )
    solution = algo.solve(problem, objective)
    result = assemble(problem, ctx, solution, objective=objective, microbatches=microbatches)
    return replace(result, method=algo.summary, optimal=algo.exact)


__all__ = [
    "AUTO",
    "Algorithm",
    "AlgorithmRegistry",
    "Placement",
    "Problem",
    "Solution",
    "default_algorithms",
    "exhaustive",
    "exhaustive_pipelines",
    "latency",
    "plan",
    "plan_auto",
    "refine_for_support",
    "throughput",
]
