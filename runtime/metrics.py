"""Count, time and bytes per partition and per transfer, next to the plan's predictions.

One `RunMetrics` per deployment of an executor (no process-wide state). Workers measure
each stage run and pass the numbers along with the activations (`StageRecord`), so the
driver learns them without calling actors that a compiled graph keeps busy. `RayExporter`
mirrors the numbers into `ray.util.metrics` (Prometheus, through Ray's metrics agent).

A stage's time is its whole run on its worker (inputs gathered, the runner's call, outputs
copied for the next worker); the runner's call alone is kept beside it, and a hop's time
is from the producer's values being ready to the consumer starting (`wait_ms`). The
recent runs' medians (`snapshot`) are what feedback folds into the cost model; re-plans
made online (runtime/online.py) are counted here too (`ReplanEvent`).
"""

from __future__ import annotations

import logging
import statistics
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.partitioner.plan import Plan
from hetero.runtime.stage import CALLER, StageSpec

log = logging.getLogger("hetero.runtime")


@dataclass(frozen=True)
class StageRecord:
    """One run of one stage, measured on its worker."""

    index: int
    ms: float  # the runner's call, inputs already on the device
    out_bytes: int
    in_bytes: tuple[tuple[int, int], ...]  # (source stage or CALLER, bytes read from it)
    wait_ms: tuple[tuple[int, float], ...] = ()  # (source, its finish -> this start), same clock
    stage_ms: float = 0.0  # the whole stage on its worker: inputs gathered -> outputs ready
    # a split stage's overlapped hand-offs on the GPU's timeline, x sent -> the CPU's rows
    # back, summed (None: not timed; backends/gpu_cpu_mm.HandoffClock)
    cpu_rows_ms: float | None = None


def nbytes(values: Iterable[Any]) -> int:
    """Bytes of every tensor in `values` (an activation may be a tuple of tensors)."""
    total = 0
    for value in values:
        # plain tensors (nearly every value) without pytree's walk: it ran twice per stage
        leaves = (value,) if isinstance(value, torch.Tensor) else pytree.tree_leaves(value)
        for v in leaves:
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    return total


RECENT = 64  # runs per stage and hop whose times are kept for medians


@dataclass(frozen=True)
class StageStats:
    index: int
    runs: int  # warm runs (the cold first one not counted)
    runner_ms: float  # median over the recent warm runs: the runner's call
    stage_ms: float  # the same runs, the whole stage on its worker
    cpu_rows_ms: float | None = None  # the same runs' split hand-offs (StageRecord), if timed


@dataclass(frozen=True)
class HopStats:
    src: int  # stage index or CALLER
    dst: int
    runs: int  # runs where this hop brought the stage's last input
    bytes: int  # per run
    wait_ms: float  # median: the source's values ready -> the stage starts


@dataclass(frozen=True)
class MetricsSnapshot:
    """Medians of the recent warm runs of one deployment (plain numbers: safe to hand to
    another thread while the deployment keeps serving)."""

    stages: tuple[StageStats, ...]
    hops: tuple[HopStats, ...]
    requests: int


@dataclass(frozen=True)
class ReplanEvent:
    """One round of online re-planning (runtime/online.py) and what came of it."""

    request: int  # requests served (all deployments) when the round began
    reason: str  # the stage times that deviated
    current_ms: float  # the running plan, predicted with the corrected costs
    candidate_ms: float | None  # the plan the corrected costs choose (None: the same plan)
    outcome: str  # "switched", "kept" (not faster by the margin), "repriced", "failed: ..."
    seconds: float  # the round's time: fold, plan, compile
    applied_at: int = -1  # requests served when its result took effect


@dataclass
class _Stage:
    count: int = 0
    total_ms: float = 0.0  # the whole stage (the runner's call where no stage time came)
    runner_ms: float = 0.0
    out_bytes: int = 0
    first_ms: float = 0.0  # the cold first run (lazy init, page faults): kept apart from the mean
    recent_runner: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_stage: deque = field(default_factory=lambda: deque(maxlen=RECENT))
    recent_cpu_rows: deque = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass
class _Transfer:
    count: int = 0
    bytes: int = 0
    total_ms: float = 0.0
    timed: int = 0
    last: int = 0  # runs where it brought the stage's last input
    recent_hop: deque = field(default_factory=lambda: deque(maxlen=RECENT))


@dataclass
class RunMetrics:
    stages: Sequence[StageSpec]
    plan: Plan | None = None
    exporter: Any = None  # RayExporter or None
    requests: int = 0
    request_ms: float = 0.0
    # online re-planning rounds of the executor, oldest first: shared by the metrics of all
    # its deployments (a switch starts new metrics and hands this list on)
    replans: list[ReplanEvent] = field(default_factory=list)
    _stage: dict[int, _Stage] = field(default_factory=dict)
    _transfer: dict[tuple[int, int], _Transfer] = field(default_factory=dict)

    def record(self, rec: StageRecord) -> None:
        s = self._stage.setdefault(rec.index, _Stage())
        whole = rec.stage_ms or rec.ms
        if s.count == 0 and not s.first_ms:
            s.first_ms = whole
        else:
            s.count += 1
            s.total_ms += whole
            s.runner_ms += rec.ms
            s.recent_runner.append(rec.ms)
            s.recent_stage.append(whole)
            if rec.cpu_rows_ms is not None:
                s.recent_cpu_rows.append(rec.cpu_rows_ms)
        s.out_bytes += rec.out_bytes
        waits = dict(rec.wait_ms)
        # the source whose values came last started the stage: its wait is the hop's time
        last = min(waits, key=waits.__getitem__) if waits else None
        for src, b in rec.in_bytes:
            t = self._transfer.setdefault((src, rec.index), _Transfer())
            t.count += 1
            t.bytes += b
            if src in waits:
                t.total_ms += waits[src]
                t.timed += 1
            if src == last and s.count:
                t.last += 1
                t.recent_hop.append(waits[src])
        if self.exporter is not None:
            self.exporter.stage(self._device(rec.index), rec)

    def forget_runs(self) -> None:
        """Drop every run measured so far (not the re-plans): what runs changed under them
        (a measured choice settled), and a median over both would price neither."""
        self._stage.clear()
        self._transfer.clear()
        self.requests = 0
        self.request_ms = 0.0

    def record_replan(self, event: ReplanEvent) -> None:
        self.replans.append(event)
        if self.exporter is not None:
            self.exporter.replan(event)

    def snapshot(self, window: int = RECENT, quantile: float = 0.5) -> MetricsSnapshot:
        """Medians (or another `quantile`) of the last `window` warm runs per stage and per
        hop. A low quantile is the undisturbed time on a machine other work loads."""

        def median(values: deque) -> float:
            recent = sorted(list(values)[-window:])
            if quantile == 0.5:
                return statistics.median(recent)
            return recent[min(len(recent) - 1, int(quantile * len(recent)))]

        stages = tuple(
            StageStats(
                i,
                s.count,
                median(s.recent_runner),
                median(s.recent_stage),
                median(s.recent_cpu_rows) if s.recent_cpu_rows else None,
            )
            for i, s in sorted(self._stage.items())
            if s.recent_stage
        )
        hops = tuple(
            HopStats(src, dst, t.last, t.bytes // max(t.count, 1), median(t.recent_hop))
            for (src, dst), t in sorted(self._transfer.items())
            if t.recent_hop
        )
        return MetricsSnapshot(stages, hops, self.requests)

    def record_request(self, ms: float) -> None:
        self.requests += 1
        self.request_ms += ms
        if self.exporter is not None:
            self.exporter.request(ms)

    def measured_ms(self) -> dict[int, float]:
        """Mean ms per stage (the whole stage on its worker) over warm runs (the first run
        only while it is the only one)."""
        return {
            i: s.total_ms / s.count if s.count else s.first_ms
            for i, s in sorted(self._stage.items())
            if s.count or s.first_ms
        }

    def _device(self, index: int) -> str:
        for s in self.stages:
            if s.index == index:
                return s.device.name
        return "caller" if index == CALLER else f"p{index}"

    def _predicted_transfer(self, src: int, dst: int) -> float | None:
        if self.plan is None:
            return None
        for t in self.plan.transfers:
            if t.src == src and t.dst == dst:
                return t.predicted_ms
        return None

    def table(self) -> str:
        """Per partition and per transfer: count, measured vs predicted ms, bytes."""
        lines = [
            f"{'partition':<10} {'device':<22} {'backend':<8} {'runs':>6} "
            f"{'measured ms':>12} {'predicted ms':>13} {'out bytes/run':>14}"
        ]
        by_index = {s.index: s for s in self.stages}
        means = self.measured_ms()
        for i, st in sorted(self._stage.items()):
            spec = by_index.get(i)
            pred = spec.predicted_ms if spec else 0.0
            lines.append(
                f"p{i:<9} {(spec.device.name if spec else '?'):<22} "
                f"{(spec.backend if spec else '?'):<8} {st.count:>6} "
                f"{means.get(i, 0.0):>12.3f} {_fmt(pred):>13} "
                f"{st.out_bytes // max(st.count + 1, 1):>14}"
            )
        lines.append("")
        lines.append(
            f"{'transfer':<16} {'runs':>6} {'bytes/run':>12} {'measured ms':>12} {'predicted ms':>13}"
        )
        for (src, dst), t in sorted(self._transfer.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            name = f"{_end(src)}->{_end(dst)}"
            measured = t.total_ms / t.timed if t.timed else None
            lines.append(
                f"{name:<16} {t.count:>6} {t.bytes // max(t.count, 1):>12} "
                f"{_fmt(measured):>12} {_fmt(self._predicted_transfer(src, dst)):>13}"
            )
        if self.requests:
            lines.append("")
            lines.append(
                f"requests: {self.requests}, mean {self.request_ms / self.requests:.3f} ms"
                + (f" (plan predicts {self.plan.predicted_ms:.3f} ms)" if self.plan else "")
            )
        if self.replans:
            lines.append("")
            lines.append(
                f"{'re-plan at':<12} {'outcome':<10} {'current ms':>11} {'new ms':>9}  why"
            )
            for e in self.replans:
                lines.append(
                    f"{'request ' + str(e.request):<12} {e.outcome.split(':')[0]:<10} "
                    f"{e.current_ms:>11.3f} {_fmt(e.candidate_ms):>9}  {e.reason}"
                )
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "stages": {
                i: {"runs": s.count + 1, "mean_ms": self.measured_ms()[i], "out_bytes": s.out_bytes}
                for i, s in self._stage.items()
                if s.count or s.first_ms
            },
            "transfers": {
                f"{_end(a)}->{_end(b)}": {"runs": t.count, "bytes": t.bytes}
                for (a, b), t in self._transfer.items()
            },
            "requests": self.requests,
            "mean_request_ms": self.request_ms / self.requests if self.requests else None,
            "replans": [asdict(e) for e in self.replans],
        }


def _end(i: int) -> str:
    return "in" if i == CALLER else f"p{i}"


def _fmt(v: float | None) -> str:
    return "-" if v is None or v == 0.0 else f"{v:.3f}"


class RayExporter:
    """`ray.util.metrics` series: hetero_partition_{runs,ms,bytes}, hetero_transfer_bytes,
    hetero_request_ms, hetero_replans, tagged by partition, device, source and destination
    (re-plans by outcome)."""

    def __init__(self, deployment: str) -> None:
        from ray.util import metrics  # optional (hetero[ray]): loaded on first use

        tags = ("deployment", "partition", "device")
        self._tags = {"deployment": deployment}
        self.runs = metrics.Counter("hetero_partition_runs", "runs of a partition", tag_keys=tags)
        self.ms = metrics.Histogram(
            "hetero_partition_ms",
            "compute time of a partition run (ms)",
            boundaries=[0.1, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000],
            tag_keys=tags,
        )
        self.bytes = metrics.Counter(
            "hetero_partition_out_bytes", "bytes a partition produced", tag_keys=tags
        )
        self.transfer = metrics.Counter(
            "hetero_transfer_bytes",
            "bytes moved between partitions",
            tag_keys=("deployment", "src", "dst"),
        )
        self.request_ms = metrics.Histogram(
            "hetero_request_ms",
            "end-to-end time of one request (ms)",
            boundaries=[0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000],
            tag_keys=("deployment",),
        )
        self.replans = metrics.Counter(
            "hetero_replans",
            "online re-planning rounds, by outcome (switched, kept, repriced, failed)",
            tag_keys=("deployment", "outcome"),
        )

    def stage(self, device: str, rec: StageRecord) -> None:
        tags = {**self._tags, "partition": f"p{rec.index}", "device": device}
        self.runs.inc(1, tags)
        self.ms.observe(rec.ms, tags)
        self.bytes.inc(rec.out_bytes, tags)
        for src, b in rec.in_bytes:
            if b:
                self.transfer.inc(b, {**self._tags, "src": _end(src), "dst": f"p{rec.index}"})

    def request(self, ms: float) -> None:
        self.request_ms.observe(ms, self._tags)

    def replan(self, event: ReplanEvent) -> None:
        self.replans.inc(1, {**self._tags, "outcome": event.outcome.split(":")[0]})


def make_exporter(deployment: str) -> RayExporter | None:
    try:
        return RayExporter(deployment)
    except Exception as e:  # metrics are optional: never fail a deployment over them
        log.warning("ray.util.metrics unavailable (%s); metrics stay in-process", e)
        return None
