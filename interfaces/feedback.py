"""`hetero.compile(..., feedback=True)`: a compiled model that learns from what it measures.

The runtime reports per-stage and per-hop times (runtime/metrics.py); this module, which
knows the graph, the settings and the compiler, turns them into run records
(`calibration.feedback.partition_runs`), folds them into the cost model's profile
(`calibration.feedback.fold`), prices the running plan again with the corrected costs
(`partitioner.reprice`), plans again with them, and compiles the new plan when it is
predicted faster by the policy's margin (the artifact cache makes the partitions that did
not change free). It is the `Retune` hook of the runtime's `OnlineReplanner`, which decides
when to ask and switches between requests; `CompiledModel.run_log()` uses the same records
for `hetero calibrate --from-runs`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from hetero.calibration.feedback import (
    Measured,
    MeasuredHop,
    corrected,
    hop_runs,
    partition_runs,
)
from hetero.cluster.runs import RunLog
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.algorithms import plan as make_plan
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import ExecutorKind, Objective
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.partitioner.reprice import Pricing, assignment_of, pricing, reprice
from hetero.runtime.metrics import MetricsSnapshot
from hetero.runtime.online import Observation, Proposal, ReplanPolicy
from hetero.runtime.replan import StagedPlan
from hetero.runtime.stage import StageSpec

Compile = Callable[[ClusterSpec, Plan], "tuple[Sequence[StageSpec], Plan]"]


def measured_partitions(stages: Sequence[StageSpec], snap: MetricsSnapshot) -> dict[int, Measured]:
    """Plan partition index -> its measured times (a streamed partition's pieces summed)."""
    plan_index = {s.index: s.plan_index for s in stages}
    out: dict[int, Measured] = {}
    for st in snap.stages:
        k = plan_index.get(st.index, st.index)
        m = out.get(k)
        out[k] = (
            Measured(st.runs, st.runner_ms, st.stage_ms, st.cpu_rows_ms)
            if m is None
            else Measured(
                min(m.runs, st.runs),
                m.runner_ms + st.runner_ms,
                m.stage_ms + st.stage_ms,
                _added(m.cpu_rows_ms, st.cpu_rows_ms),
            )
        )
    return out


def _added(a: float | None, b: float | None) -> float | None:
    """A partition's pieces' hand-off spans summed; None where none was timed."""
    if a is None or b is None:
        return a if b is None else b
    return a + b


def measured_hops(snap: MetricsSnapshot) -> dict[tuple[int, int], MeasuredHop]:
    return {(h.src, h.dst): MeasuredHop(h.runs, h.bytes, h.wait_ms) for h in snap.hops}


class Feedback:
    """Run records of a compiled model's deployments, and the online re-planning hook."""

    def __init__(
        self,
        graph: OpGraph,
        cluster: ClusterSpec,
        objective: Objective,
        plan_kwargs: Mapping[str, Any],
        *,
        registry: Any,
        cost_model: CostModel,
        executor: ExecutorKind,
        compile_plan: Compile,
        policy: ReplanPolicy | None = None,
    ) -> None:
        """`plan_kwargs`: what the model was planned with besides the graph, the cluster,
        the objective and the cost model (backends, pins, exclude, microbatches). `cost_model`
        is the one it was planned with: its profile without feedback is what every fold
        starts from, so records are never counted twice."""
        self.graph = graph
        self.cluster = cluster
        self.objective = objective
        self.plan_kwargs = {k: v for k, v in plan_kwargs.items() if k != "cost_model"}
        self.registry = registry
        self.base = cost_model.base()
        self.executor = executor
        self.compile_plan = compile_plan
        self.policy = policy or ReplanPolicy()
        self._logs: dict[tuple, RunLog] = {}  # the latest records of each deployment run
        self._lock = threading.Lock()
        self.cost_model = cost_model  # the latest corrected one

    # ---- records ---------------------------------------------------------------------------------
    def pricing(self, cost_model: CostModel) -> Pricing:
        return pricing(
            self.graph,
            self.cluster,
            self.objective,
            registry=self.registry,
            cost_model=cost_model,
            **self.plan_kwargs,
        )

    def records(self, deployment: StagedPlan, snap: MetricsSnapshot) -> RunLog:
        """The run log of one deployment from its metrics' snapshot."""
        if deployment.plan is None:
            return RunLog(self.cluster.name)
        priced = self.pricing(self.base)
        return RunLog(
            self.cluster.name,
            partitions=partition_runs(
                deployment.plan,
                priced,
                measured_partitions(deployment.stages, snap),
                executor=self.executor,
            ),
            hops=hop_runs(deployment.plan, priced, measured_hops(snap), executor=self.executor),
        )

    def remember(self, deployment: StagedPlan, snap: MetricsSnapshot) -> RunLog:
        """Keep the deployment's latest records; all deployments' records so far."""
        log = self.records(deployment, snap)
        key = tuple((s.index, s.device.name, s.artifact.key) for s in deployment.stages)
        with self._lock:
            self._logs[key] = log
            return RunLog.merge(self.cluster.name, self._logs.values())

    def corrected(self, log: RunLog) -> CostModel:
        return corrected(self.base, log, self.policy.min_ms / 1e3)

    # ---- the online hook ------------------------------------------------------------------------
    def __call__(self, obs: Observation) -> Proposal:
        log = self.remember(obs.deployment, obs.snapshot)
        cm = self.corrected(log)
        self.cost_model = cm
        running = obs.deployment.plan
        if running is None:
            raise ValueError("online re-planning needs the running deployment's plan")
        runs = sum(r.runs for r in log.partitions)
        note = (
            f"costs corrected by feedback after request {obs.request} "
            f"({len(log.partitions)} partition record(s), {runs} runs)"
        )
        priced = self.pricing(cm)
        current_plan = reprice(running, priced, note=note)
        current = StagedPlan(restage(obs.deployment.stages, running, current_plan), current_plan)
        best = make_plan(
            self.graph,
            self.cluster,
            self.objective,
            registry=self.registry,
            cost_model=cm,
            **self.plan_kwargs,
        )
        if (assignment_of(best, priced) == assignment_of(current_plan, priced)).all():
            return Proposal(current, current_plan.predicted_ms)
        margin = self.policy.margin
        if best.predicted_ms > current_plan.predicted_ms * (1.0 - margin):
            return Proposal(current, current_plan.predicted_ms, None, best.predicted_ms)
        best = replace(
            best,
            notes=(
                *best.notes,
                note,
                f"re-planned online after request {obs.request}: {obs.reason}; predicted "
                f"{best.predicted_ms:.3f} ms against {current_plan.predicted_ms:.3f} ms for the "
                "plan it replaced, both with the corrected costs",
            ),
        )
        stages, best = self.compile_plan(self.cluster, best)
        return Proposal(
            current, current_plan.predicted_ms, StagedPlan(tuple(stages), best), best.predicted_ms
        )


def restage(stages: Sequence[StageSpec], before: Plan, after: Plan) -> tuple[StageSpec, ...]:
    """`stages` with their predictions scaled as `after` re-priced their plan partitions."""
    old = {p.index: p.predicted_ms for p in before.partitions}
    new = {p.index: p.predicted_ms for p in after.partitions}
    out = []
    for s in stages:
        k = s.plan_index
        ratio = new[k] / old[k] if old.get(k) and k in new else 1.0
        out.append(replace(s, predicted_ms=s.predicted_ms * ratio))
    return tuple(out)
