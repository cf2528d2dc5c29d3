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

Both corrections go both ways: a placement measured faster than priced lowers its term
(never below zero: the calibrated copies and calls stay). Within `_AGREES` of the price a
partition is evidence of nothing. Resident partitions (a GPU's layers, a CPU's LM head) are
fitted as the forward path fits them (`resident_feedback`: calibration/feedback.py's run
records and fold, keyed by device, backend, op class and shape bucket), so the corrections
reach the same op classes wherever a re-plan puts them.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Mapping
from dataclasses import dataclass

from hetero.calibration.feedback import Measured, corrected, partition_runs
from hetero.cluster.profile import ALL_CLASSES, CalibrationProfile
from hetero.cluster.runs import RunLog
from hetero.partitioner.cost import CostModel
from hetero.partitioner.plan import Plan
from hetero.partitioner.reprice import Pricing

_AGREES = 1.05  # measured within this factor of the prediction: no evidence either way


@dataclass(frozen=True)
class HostFeedback:
    """What one round found for one placement: its unpriced host time per unit."""

    weights: str  # the placement measured: "split" (per hand-off) or "streamed" (per call)
    extra_s: float  # seconds per unit added to its term (below 0: taken off), this round
    partitions: int  # partitions of that placement measured
    cost_model: CostModel  # the cost model with it folded in
    # "split": seconds per second of the CPU's rows added to `split_cpu` (below 0: taken off)
    cpu_extra: float = 0.0
    cpu_timed: bool = False  # that term from the hand-offs' timed spans, not from a fit

    def note(self) -> str:
        what = "split hand-offs" if self.weights == "split" else "streamed layers' calls"
        said = []
        if self.extra_s:
            how = "beyond" if self.extra_s > 0 else "below"
            said.append(f"{what} measured {1e3 * abs(self.extra_s):.3f} ms each {how} their price")
        if abs(self.cpu_extra) >= 0.005:  # a timed factor within noise of its price is none
            # the term now and before (a delta from the prior would read as the rows' speed)
            now = self.cost_model.split_cpu()
            how = "their hand-offs timed" if self.cpu_timed else "fitted"
            said.append(
                f"split CPU rows {now:+.0%} against calibrated ({how}; priced "
                f"{now - self.cpu_extra:+.0%} before)"
            )
        return (
            f"feedback: {', '.join(said)} ({self.partitions} {self.weights} partition(s) of the "
            "running decode step)"
        )


def split_feedback(
    decode: Plan,
    measured_ms: Mapping[int, float],
    cost_model: CostModel,
    cluster: str,
    cpu_rows_ms: Mapping[int, float] | None = None,
) -> HostFeedback | None:
    """The unpriced host time of `decode`'s split partitions, from their measured ms
    (partition index -> ms), folded into `cost_model`; None when the split partitions ran as
    priced (every one within `_AGREES`).

    Where the runtime timed the hand-offs (`cpu_rows_ms`: partition index -> its hand-offs'
    spans on the GPU's timeline, x sent -> the CPU's rows back, summed), the CPU term is
    read from them: the spans over the rows' calibrated time, pooled over the partitions,
    is the CPU's in-step factor, and what the partitions ran beyond their prices with that
    factor, per hand-off, is the hand-offs'. An H100 host's Qwen2-7B split layers (run 34)
    overran by 12%; the trace put it on the CPU's rows (their task thread busy all the
    layer, the link idle a fifth of it), and the fit below, with every layer one point, had
    given it to the hand-offs: each re-plan moved away from splitting and measured slower.
    Timed (run 36, the 7B): rows 46% slower than calibrated, re-planned 115.8 -> 100.7 ms.

    Without timed spans:
    A split partition's excess has two causes the prices keep apart: work per hand-off (the
    program's launches and guards between them: `split_handoff`) and CPU rows slower in the
    step than calibrated alone (`split_cpu`, per second of the rows). One kind of partition
    cannot tell them apart (25 layers alike are one equation); partitions whose CPU seconds
    per hand-off differ can (an H200 run's split layers and split LM head: run 26). So the
    excess per hand-off is fitted as a line over the CPU's calibrated seconds per hand-off
    (Theil-Sen: a slope from every pair of partitions that differ, robust to a few slow
    runs); where they all sit at one point the excess goes to the hand-offs, as it did
    before the CPU term was measured."""
    timed = _timed_split(decode, measured_ms, cost_model, cpu_rows_ms or {})
    if timed is not None:
        cpu, handoff, seen = timed
        if cpu == 0.0 and handoff == 0.0:
            return None
        cm = _with_runtime(cost_model, cluster, split_handoff=handoff, split_cpu=cpu)
        return HostFeedback("split", handoff, seen, cm, cpu_extra=cpu, cpu_timed=True)
    points, seen = [], 0
    for p in decode.partitions:
        got = measured_ms.get(p.index)
        if p.weights != "split" or not p.handoffs or got is None:
            continue
        seen += 1
        if got > _AGREES * p.predicted_ms:
            # the host path is what ran long: a link-bound layer would have taken its prediction
            excess = max(0.0, got - p.host_ms)
        elif got * _AGREES < p.predicted_ms:
            # faster than priced: the host's terms are too high (a link-bound layer's price does
            # not move with them, which is all the evidence allows)
            excess = got * _AGREES - p.predicted_ms
        else:
            excess = 0.0
        points.append((p.cpu_ms / p.handoffs / 1e3, excess / p.handoffs / 1e3))
    if not points:
        return None
    now = cost_model.runtime()
    per_handoff, per_cpu_s = _line(points, -now.split_handoff, -now.split_cpu)
    if per_handoff == 0.0 and per_cpu_s == 0.0:
        return None
    cm = _with_runtime(cost_model, cluster, split_handoff=per_handoff, split_cpu=per_cpu_s)
    return HostFeedback("split", per_handoff, seen, cm, cpu_extra=per_cpu_s)


def _timed_split(
    decode: Plan,
    measured_ms: Mapping[int, float],
    cost_model: CostModel,
    cpu_rows_ms: Mapping[int, float],
) -> tuple[float, float, int] | None:
    """(CPU term delta, hand-off term delta in s, split partitions measured) from the
    hand-offs' spans; None where no split partition has them.

    Pooled, not a median over partitions: they differ in size (a run of 24 split layers
    beside one split layer after a CPU layer, run 35), and the one-layer partition's first
    hand-off waits for the pipeline to refill; as one of two points it set both terms."""
    split = [
        (p, measured_ms[p.index])
        for p in decode.partitions
        if p.weights == "split" and p.handoffs and p.index in measured_ms
    ]
    timed = [(p, cpu_rows_ms[p.index]) for p, _ in split if p.index in cpu_rows_ms and p.cpu_ms > 0]
    if not timed:
        return None
    now = cost_model.runtime()
    # the spans hold the GPU's own share too where it is the longer: a floor of "as
    # calibrated" keeps such a partition from pricing the CPU faster than measured alone
    factor = sum(span for _, span in timed) / sum(p.cpu_ms for p, _ in timed)
    cpu = max(-now.split_cpu, factor - 1.0 - now.split_cpu)
    excess = 0.0
    for p, got in split:
        # the price with the CPU term moved: its host path grows by the rows' share of it
        price = max(p.predicted_ms, p.host_ms + cpu * p.cpu_ms)
        if got > _AGREES * price:
            excess += got - price
        elif got * _AGREES < price:
            excess += got * _AGREES - price
    handoff = max(-now.split_handoff, excess / sum(p.handoffs for p, _ in split) / 1e3)
    return cpu, handoff, len(split)


_DISTINCT = 1.2  # CPU seconds per hand-off this many times apart: two points, not one


def _line(points: list[tuple[float, float]], floor_a: float, floor_b: float) -> tuple[float, float]:
    """(a, b) of y = a + b*x through `points` (x, y), robustly: b the median slope over pairs
    whose x differ by `_DISTINCT`, a the median of y - b*x; b = 0 where no pair differs. Each
    kept at or above its floor (a term lowered below zero would price work as negative),
    the other refitted when one is held there."""
    slopes = [
        (y2 - y1) / (x2 - x1)
        for i, (x1, y1) in enumerate(points)
        for x2, y2 in points[i + 1 :]
        if max(x1, x2) > _DISTINCT * min(x1, x2)
    ]
    b = max(floor_b, statistics.median(slopes) if slopes else 0.0)
    a = statistics.median(y - b * x for x, y in points)
    if a < floor_a:
        a = floor_a
        if slopes:  # the CPU term takes what the hand-offs cannot
            b = max(floor_b, statistics.median((y - a) / x for x, y in points if x > 0))
    return a, b


def with_split_handoff(cost_model: CostModel, cluster: str, extra_s: float) -> CostModel:
    """`cost_model` with `extra_s` more per split hand-off for its executor (never below 0)."""
    return _with_runtime(cost_model, cluster, split_handoff=extra_s)


def stream_feedback(
    decode: Plan, measured_ms: Mapping[int, float], cost_model: CostModel, cluster: str
) -> HostFeedback | None:
    """The unpriced host time per call of `decode`'s streamed partitions (one call per group
    each), folded into `cost_model`; None when they ran as priced. A streamed partition's
    measured time is its host time (its kernels run after), so an excess is host work the
    plan did not price, and a shortfall host work it priced twice."""
    extras, seen = [], 0
    for p in decode.partitions:
        got = measured_ms.get(p.index)
        if p.weights != "streamed" or got is None or not p.groups:
            continue
        seen += 1
        if got > _AGREES * p.predicted_ms:
            gap = got - _AGREES * p.predicted_ms
        elif got * _AGREES < p.predicted_ms:
            gap = got * _AGREES - p.predicted_ms
        else:
            gap = 0.0
        extras.append(gap / len(p.groups) / 1e3)
    return _folded("streamed", extras, seen, cost_model, cluster, "stream_call")


def _folded(
    weights: str, extras: list[float], seen: int, cost_model: CostModel, cluster: str, term: str
) -> HostFeedback | None:
    """The median extra folded into `term`, floored so the term stays >= 0; None when that
    changes nothing."""
    if not extras:
        return None
    now = cost_model.runtime()
    applied = max(statistics.median(extras), -getattr(now, term))
    if applied == 0.0:
        return None
    return HostFeedback(
        weights, applied, seen, _with_runtime(cost_model, cluster, **{term: applied})
    )


@dataclass(frozen=True)
class ResidentFeedback:
    """Resident partitions' measured times folded into the cost model (per device, backend,
    op class and shape bucket, and the executor's per-stage work)."""

    log: RunLog  # the records folded (every measured resident partition)
    folded: int  # of which above the floor (the others are jitter to a fit)
    cost_model: CostModel

    local: bool = False  # the fit without its device-wide fallback (`localised`)

    def note(self) -> str:
        devices = sorted({r.device for r in self.log.partitions})
        where = "their op classes" if not self.local else "the op classes they ran"
        return (
            f"feedback: {self.folded} resident partition(s) on {', '.join(devices)} folded into "
            f"the prices of {where}"
        )

    def localised(self, prior: CostModel) -> ResidentFeedback:
        """The same fit without its device-wide factor (`ALL_CLASSES`) on the (device,
        backend) pairs it refitted: op classes none of its partitions ran keep `prior`'s
        price. From a few partitions a device-wide factor can be wrong by orders of
        magnitude (one partition slowed by a fixed delay priced every class of its GPU
        ~900x); the classes they ran are still priced as measured."""
        profile = self.cost_model.profile
        if profile is None:
            return self
        pairs = {(r.device, r.backend) for r in self.log.partitions}
        before = prior.profile.corrections if prior.profile is not None else ()
        kept = tuple(
            c
            for c in profile.corrections
            if c.key != ALL_CLASSES or (c.device, c.backend) not in pairs
        )
        restored = tuple(
            c for c in before if c.key == ALL_CLASSES and (c.device, c.backend) in pairs
        )
        corrections = dataclasses.replace(profile, corrections=kept + restored)
        return dataclasses.replace(
            self, cost_model=dataclasses.replace(self.cost_model, profile=corrections), local=True
        )


def resident_feedback(
    decode: Plan,
    priced: Pricing,
    measured: Mapping[int, Measured],
    cost_model: CostModel,
    *,
    min_ms: float,
) -> ResidentFeedback | None:
    """`decode`'s resident partitions as run records (`priced`: its decode problem, for the
    groups' terms), folded into `cost_model` as `hetero.compile(feedback=True)` folds a
    forward's; partitions under `min_ms` both measured and priced are recorded, not fitted.
    None when no resident partition was measured."""
    runs = partition_runs(decode, priced, measured, executor=cost_model.executor)
    if not runs:
        return None
    log = RunLog(cluster=priced.context.cluster.name, partitions=runs)
    folded = sum(max(r.measured_s, r.base_s) >= min_ms / 1e3 for r in runs)
    return ResidentFeedback(log, folded, corrected(cost_model, log, min_ms / 1e3))


def _with_runtime(cost_model: CostModel, cluster: str, **more: float) -> CostModel:
    """`cost_model` with each of `more` (a RuntimeProfile field) moved by its value, never
    below 0 (a measured term lowered past nothing would price host work as negative)."""
    profile = cost_model.profile or CalibrationProfile(cluster=cluster)
    # from the terms in force: an executor's defaults stay until measured (`default_runtime`)
    now = cost_model.runtime()
    updated = dataclasses.replace(
        now, **{k: max(0.0, getattr(now, k) + v) for k, v in more.items()}
    )
    runtime = (*(r for r in profile.runtime if r.executor != cost_model.executor), updated)
    return dataclasses.replace(cost_model, profile=dataclasses.replace(profile, runtime=runtime))
