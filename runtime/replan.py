"""Re-planning when devices are gone for good: the caller's hook builds new stages for
the cluster that remains; the executor switches to them between requests and logs
both plans.

The hook is `replan(cluster_without_lost_devices) -> stages` or `-> (stages, plan)`;
`hetero.compile` wires it to the planner and the compiler (whose cache makes the
partitions that did not move free to rebuild).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
from hetero.partitioner.plan import Plan
from hetero.runtime.stage import StageSpec

log = logging.getLogger("hetero.runtime")

Replan = Callable[[ClusterSpec], "Sequence[StageSpec] | tuple[Sequence[StageSpec], Plan]"]


@dataclass(frozen=True)
class StagedPlan:
    """What an executor runs: stages, and the plan they came from when known."""

    stages: tuple[StageSpec, ...]
    plan: Plan | None = None

    def explain(self) -> str:
        if self.plan is not None:
            try:
                return self.plan.explain()
            except Exception as e:  # the explain table is for people; never block a switch
                log.debug("plan.explain() failed: %s", e)
        return stage_table(self.stages)


def stage_table(stages: Sequence[StageSpec]) -> str:
    lines = [f"{'partition':<10} {'device':<24} {'backend':<8} {'ops':>5} {'predicted ms':>13}"]
    for s in stages:
        lines.append(
            f"{s.name:<10} {s.device.name:<24} {s.backend:<8} {len(s.nodes):>5} "
            f"{s.predicted_ms:>13.3f}"
        )
    return "\n".join(lines)


def call_replan(hook: Replan, cluster: ClusterSpec) -> StagedPlan:
    result = hook(cluster)
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[1], Plan | None):
        stages, plan = result
    else:
        stages, plan = result, None
    stages = tuple(stages)
    gone = [s for s in stages if s.device.name not in {d.name for d in cluster.devices}]
    if gone:
        raise ConfigError(
            "the replan hook placed partitions on devices that are gone: "
            + ", ".join(f"{s.name} on {s.device.name}" for s in gone)
        )
    return StagedPlan(stages, plan)


def log_switch(lost: dict[str, str], before: StagedPlan, after: StagedPlan) -> None:
    log.warning(
        "devices gone for good: %s. Re-planned and switched between requests.\n"
        "before:\n%s\nafter:\n%s",
        "; ".join(f"{d} ({why})" for d, why in lost.items()),
        before.explain(),
        after.explain(),
    )
