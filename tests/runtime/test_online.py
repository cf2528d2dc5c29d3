"""Online re-planning in the runtime: when it asks (warm-up, deviation, cool-down), what it
switches to (margin), and that no request is lost or answered wrong while it switches."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from rt_helpers import make_stages

from hetero.runtime.executor import LocalExecutor
from hetero.runtime.metrics import HopStats, MetricsSnapshot, StageStats
from hetero.runtime.online import (
    OnlineReplanner,
    Proposal,
    ReplanPolicy,
    deviations,
)
from hetero.runtime.replan import StagedPlan

# every stage predicted at a microsecond: any measured run deviates
FAST = ReplanPolicy(warmup=3, window=2, min_ms=0.0, threshold=0.25, cooldown=4, background=False)


def predicted(stages, ms: float = 1e-3):
    return tuple(dataclasses.replace(s, predicted_ms=ms) for s in stages)


class Hook:
    """A Retune hook that offers `candidate` at `candidate_ms` (or raises `error`)."""

    def __init__(self, candidate=None, current_ms=10.0, candidate_ms=None, error=None):
        self.candidate, self.current_ms, self.candidate_ms = candidate, current_ms, candidate_ms
        self.error = error
        self.calls: list = []

    def __call__(self, obs):
        self.calls.append(obs)
        if self.error is not None:
            raise self.error
        return Proposal(obs.deployment, self.current_ms, self.candidate, self.candidate_ms)


def serve(ex, inputs, expected, n):
    for _ in range(n):
        out = ex.run(inputs)
        assert torch.allclose(out[ex.needed_outputs[0]], expected, atol=1e-5)


def test_deviations_name_the_stages_that_left_their_predictions(staged):
    stages, _, _, _ = staged
    dep = StagedPlan(predicted(stages, 1.0))
    snap = MetricsSnapshot(
        (StageStats(stages[0].index, 5, 1.0, 1.1), StageStats(stages[1].index, 5, 3.0, 3.2)),
        (HopStats(-1, stages[0].index, 5, 64, 0.1),),
        10,
    )
    policy = ReplanPolicy(threshold=0.25, min_ms=0.5)
    [why] = deviations(dep, snap, policy)
    assert why.startswith(f"{stages[1].name} on {stages[1].device.name}: 3.20 ms measured")
    assert deviations(dep, snap, dataclasses.replace(policy, min_ms=5.0)) == []


def test_a_faster_candidate_is_switched_to_between_requests(staged, cluster, mlp, cache_dir):
    stages, needed, inputs, expected = staged
    _, _, graph = mlp
    other = make_stages(graph, cluster, ["head/cpu"] * 3, cache_dir)
    hook = Hook(StagedPlan(predicted(other)), current_ms=10.0, candidate_ms=5.0)
    online = OnlineReplanner(hook, FAST)
    with LocalExecutor(predicted(stages), needed, online=online) as ex:
        serve(ex, inputs, expected, FAST.warmup - 1)  # the warm-up: no round yet
        assert hook.calls == []
        serve(ex, inputs, expected, 1)  # the round runs after the last warm-up request ...
        assert [obs.request for obs in hook.calls] == [FAST.warmup]
        assert ex.history == []
        serve(ex, inputs, expected, 2)  # ... and the next request runs the new stages
        assert {s.device.name for s in ex.stages} == {"head/cpu"}
        assert [e.outcome for e in ex.metrics.replans] == ["switched"]
        assert ex.history[0].stages[1].device.name == "edge/npu"
        assert ex.served == FAST.warmup + 2  # every request answered, right (serve checks)
        # the new deployment warms up and cools down before the next round
        next_round = FAST.warmup + FAST.warmup + FAST.cooldown
        serve(ex, inputs, expected, next_round - 1 - ex.served)
        assert len(hook.calls) == 1
        serve(ex, inputs, expected, 1)
        assert [obs.request for obs in hook.calls] == [FAST.warmup, next_round]


def test_a_candidate_inside_the_margin_is_kept_and_rounds_back_off(staged, cluster, mlp, cache_dir):
    stages, needed, inputs, expected = staged
    _, _, graph = mlp
    other = make_stages(graph, cluster, ["head/cpu"] * 3, cache_dir)
    hook = Hook(StagedPlan(predicted(other)), current_ms=10.0, candidate_ms=9.5)  # 5% < 10%
    with LocalExecutor(predicted(stages), needed, online=OnlineReplanner(hook, FAST)) as ex:
        serve(ex, inputs, expected, 40)
        assert {s.device.name for s in ex.stages} == {"head/cpu", "edge/npu", "edge/cpu"}
        rounds = [obs.request for obs in hook.calls]
        # warm-up 3, then cool-downs of 4, 8, 16 (doubling) between the rounds
        assert rounds[:4] == [3, 3 + 4, 3 + 4 + 8, 3 + 4 + 8 + 16]
        assert {e.outcome for e in ex.metrics.replans} == {"kept"}
        assert ex.history == []


def test_a_failing_round_is_recorded_and_the_deployment_keeps_serving(staged):
    stages, needed, inputs, expected = staged
    hook = Hook(error=RuntimeError("planner broke"))
    with LocalExecutor(predicted(stages), needed, online=OnlineReplanner(hook, FAST)) as ex:
        serve(ex, inputs, expected, 6)
        [event] = ex.metrics.replans
        assert event.outcome.startswith("failed: RuntimeError: planner broke")
        assert ex.served == 6


def test_a_background_round_switches_once_it_is_done(staged, cluster, mlp, cache_dir):
    stages, needed, inputs, expected = staged
    _, _, graph = mlp
    other = make_stages(graph, cluster, ["edge/cpu"] * 3, cache_dir)
    hook = Hook(StagedPlan(predicted(other)), current_ms=10.0, candidate_ms=1.0)
    policy = dataclasses.replace(FAST, background=True)
    online = OnlineReplanner(hook, policy)
    with LocalExecutor(predicted(stages), needed, online=online) as ex:
        serve(ex, inputs, expected, policy.warmup)
        online.wait(timeout=30)
        serve(ex, inputs, expected, 1)
        assert {s.device.name for s in ex.stages} == {"edge/cpu"}
        assert ex.metrics.replans[0].outcome == "switched"


def test_a_policy_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="margin"):
        ReplanPolicy(margin=1.5)
