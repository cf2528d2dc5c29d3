"""Count, time and bytes per partition and per transfer, next to the plan's predictions.

One `RunMetrics` per executor (no process-wide state). Workers measure each stage run
and pass the numbers along with the activations (`StageRecord`), so the driver learns
them without calling actors that a compiled graph keeps busy. `RayExporter` mirrors
the numbers into `ray.util.metrics` (Prometheus, through Ray's metrics agent).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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


def nbytes(values: Iterable[Any]) -> int:
    """Bytes of every tensor in `values` (an activation may be a tuple of tensors)."""
    total = 0
    for v in pytree.tree_leaves(list(values)):
        if isinstance(v, torch.Tensor):
            total += v.numel() * v.element_size()
    return total


@dataclass
class _Stage:
    count: int = 0
    total_ms: float = 0.0
    out_bytes: int = 0
    first_ms: float = 0.0  # the cold first run (lazy init, page faults): kept apart from the mean


@dataclass
class _Transfer:
    count: int = 0
    bytes: int = 0
    total_ms: float = 0.0
    timed: int = 0


@dataclass
class RunMetrics:
    stages: Sequence[StageSpec]
    plan: Plan | None = None
    exporter: Any = None  # RayExporter or None
    requests: int = 0
    request_ms: float = 0.0
    _stage: dict[int, _Stage] = field(default_factory=dict)
    _transfer: dict[tuple[int, int], _Transfer] = field(default_factory=dict)

    def record(self, rec: StageRecord) -> None:
        s = self._stage.setdefault(rec.index, _Stage())
        if s.count == 0 and not s.first_ms:
            s.first_ms = rec.ms
        else:
            s.count += 1
            s.total_ms += rec.ms
        s.out_bytes += rec.out_bytes
        waits = dict(rec.wait_ms)
        for src, b in rec.in_bytes:
            t = self._transfer.setdefault((src, rec.index), _Transfer())
            t.count += 1
            t.bytes += b
            if src in waits:
                t.total_ms += waits[src]
                t.timed += 1
        if self.exporter is not None:
            self.exporter.stage(self._device(rec.index), rec)

    def record_request(self, ms: float) -> None:
        self.requests += 1
        self.request_ms += ms
        if self.exporter is not None:
            self.exporter.request(ms)

    def measured_ms(self) -> dict[int, float]:
        """Mean ms per stage over warm runs (the first run only while it is the only one)."""
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
        }


def _end(i: int) -> str:
    return "in" if i == CALLER else f"p{i}"


def _fmt(v: float | None) -> str:
    return "-" if v is None or v == 0.0 else f"{v:.3f}"


class RayExporter:
    """`ray.util.metrics` series: hetero_partition_{runs,ms,bytes}, hetero_transfer_bytes,
    hetero_request_ms, tagged by partition, device, source and destination."""

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


def make_exporter(deployment: str) -> RayExporter | None:
    try:
        return RayExporter(deployment)
    except Exception as e:  # metrics are optional: never fail a deployment over them
        log.warning("ray.util.metrics unavailable (%s); metrics stay in-process", e)
        return None
