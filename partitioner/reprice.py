"""Price an existing plan with another cost model (one that learned from measurements).

The planner's problem (`algorithms.adapter.build_problem`) is built again over the same
groups with the new cost model; the plan's own assignment of groups to placements is read
back from its partitions and assembled into a Plan again, so its predicted times are the
new model's, comparable with a plan the new model chooses (`algorithms.plan`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hetero.cluster.spec import ClusterSpec
from hetero.errors import PartitionError
from hetero.partitioner.algorithms.adapter import BackendLookup, Context, problem_for
from hetero.partitioner.algorithms.assemble import assemble
from hetero.partitioner.algorithms.problem import Problem, Solution
from hetero.partitioner.coarsen import GroupGraph
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment, Objective
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan


@dataclass(frozen=True)
class Pricing:
    """The planner's problem for one graph, cluster and cost model, with its context."""

    problem: Problem
    context: Context
    objective: Objective
    microbatches: int = 1

    @property
    def groups(self) -> GroupGraph:
        return self.context.groups

    @property
    def cost_model(self) -> CostModel:
        return self.context.cost_model


def pricing(
    graph: OpGraph,
    cluster: ClusterSpec,
    objective: Objective,
    *,
    registry: BackendLookup,
    cost_model: CostModel,
    backends: BackendAssignment = BackendAssignment(),
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    groups: GroupGraph | None = None,
) -> Pricing:
    """The problem `algorithms.plan` solves for these arguments (the same groups: refined
    for support the same way), priced with `cost_model`."""
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
    return Pricing(problem, ctx, objective, microbatches)


def assignment_of(plan: Plan, priced: Pricing) -> np.ndarray:
    """The placement index of every group under `plan` (by the groups its partitions name)."""
    problem = priced.problem
    placement = {
        (problem.devices[pl.device], pl.weights): i for i, pl in enumerate(problem.placements)
    }
    where = {g: (p.device, p.weights) for p in plan.partitions for g in p.groups}
    assign = np.full(problem.n, -1, dtype=int)
    missing = []
    for i, name in enumerate(problem.names):
        at = where.get(name)
        if at is None or at not in placement:
            missing.append(name if at is None else f"{name} on {at[0]} ({at[1]})")
            continue
        assign[i] = placement[at]
    if missing:
        raise PartitionError(
            f"the plan of {plan.model} does not cover these groups of the graph as planned now: "
            f"{', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}. Plan the model again "
            "(a plan made for another capture, cluster or grouping cannot be re-priced)."
        )
    return assign


def reprice(plan: Plan, priced: Pricing, note: str = "") -> Plan:
    """`plan` with every predicted time from `priced`'s cost model (partitions, transfers,
    total); `note` is added to its notes. Its measured times are kept."""
    assign = assignment_of(plan, priced)
    problem = priced.problem
    seconds = problem.throughput(assign) if priced.objective.pipelined else problem.latency(assign)
    out = assemble(
        problem,
        priced.context,
        Solution(assign, seconds, plan.algorithm),
        objective=priced.objective,
        microbatches=priced.microbatches,
    )
    # the old plan's own notes (its algorithm's, earlier feedback) after the fresh ones;
    # its pipeline summary is the old model's and gives way to the new one
    kept = tuple(n for n in plan.notes if n not in out.notes and not n.startswith("pipeline of "))
    return replace(
        out, measured_ms=plan.measured_ms, notes=out.notes + kept + ((note,) if note else ())
    )
