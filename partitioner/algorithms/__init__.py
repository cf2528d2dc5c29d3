"""Partition algorithms: one registry by name, and `plan()`, the entry point.

    auto        the default: device classes and host types, stages by a DP over counts,
                the algorithms below on small clusters, exact search within a time budget
                (auto.py; it plans from the graph, so it is not in the registry)
    latency     min-cut (2 devices, exact) / list scheduling + expansion moves (more), then
                local refinement; memory through Lagrangian penalties
    throughput  contiguous pipeline stages by dynamic programming (exact for its model)
    exhaustive  every assignment; ground truth for tests on small graphs

Each algorithm is a pure function over a `Problem` (cost arrays); `adapter.build_problem`
turns (GroupGraph, ClusterSpec, CostModel) into one and `assemble.assemble` turns the
solution into a Plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
from hetero.partitioner.algorithms.adapter import (
    DEFAULT_BACKENDS,
    build_problem,
    refine_for_support,
)
from hetero.partitioner.algorithms.assemble import assemble
from hetero.partitioner.algorithms.auto import plan_auto
from hetero.partitioner.algorithms.exhaustive import exhaustive
from hetero.partitioner.algorithms.latency import latency
from hetero.partitioner.algorithms.problem import Placement, Problem, Solution
from hetero.partitioner.algorithms.throughput import throughput
from hetero.partitioner.cost import CostModel
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.progress import Report as Progress
from hetero.partitioner.progress import progress_bar

OBJECTIVES = ("latency", "throughput")
AUTO = "auto"  # the default planner; not in the registry (it plans from the graph, not a Problem)


@dataclass(frozen=True)
class Algorithm:
    name: str
    solve: Callable[[Problem, str], Solution]  # (problem, objective) -> solution
    objectives: tuple[str, ...]  # objectives it optimises
    summary: str


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
    return AlgorithmRegistry(
        [
            Algorithm("latency", latency, ("latency",), "min-cut / list scheduling + refinement"),
            Algorithm("throughput", throughput, ("throughput",), "pipeline stages by DP"),
            Algorithm("exhaustive", exhaustive, OBJECTIVES, "every assignment (small graphs)"),
        ]
    )


def plan(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: str = "latency",
    *,
    backends: Mapping[str, str] | None = None,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    cost_model: CostModel | None = None,
    algorithm: str | None = None,
    registry=None,
    groups=None,
    time_budget_s: float | None = None,
    progress: bool | Progress | None = None,
) -> Plan:
    """Partition `graph` over `cluster`.

    backends: device kind -> backend name (default gpu: triton, cpu/npu: tvm; eager where
    one is missing). pins: module path (or op name) -> device. exclude: devices not to use.
    microbatches: for "throughput", the batch is cut into this many microbatches. registry:
    the backend registry asked which ops each backend supports. groups: a GroupGraph to
    plan over instead of `graph.coarsen()` refined where a device runs a group only in part.
    algorithm: None or "auto" (the default: see `auto.py`), or one of the registry's.
    time_budget_s: seconds "auto" may spend (its exact search stops there; it returns the
    best plan found and `Plan.optimal` says whether it is proven). progress: True for a
    progress bar on the terminal, or a callable (phase, seconds spent, budget).
    """
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective {objective!r} is not one of {', '.join(OBJECTIVES)}")
    if time_budget_s is not None and time_budget_s <= 0:
        raise ConfigError(f"time_budget_s must be positive, got {time_budget_s}")
    if algorithm in (None, AUTO):
        with progress_bar(progress) as report:
            return plan_auto(
                graph,
                cluster,
                objective,
                backends=backends,
                pins=pins,
                exclude=exclude,
                microbatches=microbatches,
                cost_model=cost_model,
                registry=registry,
                groups=groups,
                time_budget_s=time_budget_s,
                progress=report,
            )
    algo = default_algorithms().get(algorithm)
    if objective not in algo.objectives:
        raise ConfigError(
            f"algorithm {algo.name!r} optimises {', '.join(algo.objectives)}, not {objective!r}"
        )
    cost_model = cost_model if cost_model is not None else CostModel.load(cluster=cluster)
    if groups is None:
        groups = refine_for_support(
            graph.coarsen(), cluster, backends=backends, exclude=exclude, registry=registry
        )
    problem, ctx = build_problem(
        groups,
        cluster,
        cost_model,
        backends=backends,
        pins=pins,
        exclude=exclude,
        microbatches=microbatches if objective == "throughput" else 1,
        registry=registry,
    )
    solution = algo.solve(problem, objective)
    result = assemble(problem, ctx, solution, objective=objective, microbatches=microbatches)
    # exhaustive search and the pipeline DP are exact for the planner's model
    exact = algo.name == "exhaustive" or (algo.name == "throughput" and objective == "throughput")
    return replace(result, method=algo.summary, optimal=exact)


__all__ = [
    "AUTO",
    "DEFAULT_BACKENDS",
    "Algorithm",
    "AlgorithmRegistry",
    "Placement",
    "Problem",
    "Solution",
    "default_algorithms",
    "exhaustive",
    "latency",
    "plan",
    "plan_auto",
    "refine_for_support",
    "throughput",
]
