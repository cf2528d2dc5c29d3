"""What a running generation's decode steps say about the split and streamed placements' prices.

A split layer's host thread runs the compiled program between its hand-offs: kernel launches,
the guard check of the stage's compiled callable, the stage boundary. None of that is in the
calibrated hand-off (one bare `gpu_cpu_mm` in a loop), and on an H200 it was ~1.5-2 ms of a
6.8 ms layer (benchmarks/results/llm_generate.md, run 2's profile). A partition that is
host-bound shows it: its measured time exceeds its host path as priced. The excess, per
hand-off, becomes the runtime profile's `split_handoff`, so a re-plan prices every split layer
(and every fraction of one) with it and may move rows to the GPU or run whole layers on the
CPU while the link streams others.

A streamed layer's call is the same kind of cost: its compiled program's launches and guards,
on the host, between the CPU layer before it and the one after (run 13 on an H200: 1.5 ms per
streamed layer against 0.18 priced). Its excess per call becomes `stream_call`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
from hetero.partitioner.cost import CostModel
from hetero.partitioner.plan import Plan

_AGREES = 1.05  # measured within this of the prediction: no evidence of an unpriced cost


@dataclass(frozen=True)
class HostFeedback:
    """What one round found for one placement: its unpriced host time per unit."""

    weights: str  # the placement measured: "split" (per hand-off) or "streamed" (per call)
    extra_s: float  # seconds per unit beyond the price, this round
    partitions: int  # partitions of that placement measured
    cost_model: CostModel  # the cost model with it folded in

    def note(self) -> str:
        what = "split hand-offs" if self.weights == "split" else "streamed layers' calls"
        return (
            f"feedback: {what} measured {1e3 * self.extra_s:.3f} ms each beyond their price "
            f"({self.partitions} {self.weights} partition(s) of the running decode step)"
        )


def split_feedback(
    decode: Plan, measured_ms: Mapping[int, float], cost_model: CostModel, cluster: str
) -> HostFeedback | None:
    """The unpriced host time per hand-off of `decode`'s split partitions, from their
    measured ms (partition index -> ms), folded into `cost_model`; None when no split
    partition ran slower than its prediction."""
    extras, seen = [], 0
    for p in decode.partitions:
        got = measured_ms.get(p.index)
        if p.weights != "split" or not p.handoffs or got is None:
            continue
        seen += 1
        if got <= _AGREES * p.predicted_ms:
            extras.append(0.0)
            continue
        # the host path is what ran long: a link-bound layer would have taken its prediction
        extras.append(max(0.0, got - p.host_ms) / p.handoffs / 1e3)
    if not extras:
        return None
    extra = statistics.median(extras)
    if extra <= 0.0:
        return None
    return HostFeedback("split", extra, seen, with_split_handoff(cost_model, cluster, extra))


def with_split_handoff(cost_model: CostModel, cluster: str, extra_s: float) -> CostModel:
    """`cost_model` with `extra_s` more per split hand-off for its executor."""
    return _with_runtime(cost_model, cluster, split_handoff=extra_s)


def stream_feedback(
    decode: Plan, measured_ms: Mapping[int, float], cost_model: CostModel, cluster: str
) -> HostFeedback | None:
    """The unpriced host time per call of `decode`'s streamed partitions (one call per group
    each), folded into `cost_model`; None when none ran slower than predicted. A streamed
    partition's measured time is its host time (its kernels run after), so an excess is
    host work the plan did not price."""
    extras, seen = [], 0
    for p in decode.partitions:
        got = measured_ms.get(p.index)
        if p.weights != "streamed" or got is None or not p.groups:
            continue
        seen += 1
        extras.append(max(0.0, got - _AGREES * p.predicted_ms) / len(p.groups) / 1e3)
    if not extras:
        return None
    extra = statistics.median(extras)
    if extra <= 0.0:
        return None
    return HostFeedback(
        "streamed", extra, seen, _with_runtime(cost_model, cluster, stream_call=extra)
    )


def _with_runtime(cost_model: CostModel, cluster: str, **more: float) -> CostModel:
    """`cost_model` with each of `more` (a RuntimeProfile field) raised by its value."""
    profile = cost_model.profile or CalibrationProfile(cluster=cluster)
    now = profile.runtime_for(cost_model.executor) or RuntimeProfile(
        cost_model.executor, stage_overhead=0.0, hop_overhead=0.0
    )
    updated = dataclasses.replace(now, **{k: getattr(now, k) + v for k, v in more.items()})
    runtime = (*(r for r in profile.runtime if r.executor != cost_model.executor), updated)
    return dataclasses.replace(cost_model, profile=dataclasses.replace(profile, runtime=runtime))
