"""Throughput mode: microbatches flow through the stages concurrently; the measured rate
is reported next to the plan's prediction."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from hetero.partitioner.plan import Plan
from hetero.runtime.stage import Executor


@dataclass(frozen=True)
class Throughput:
    items: int
    seconds: float
    predicted_per_s: float | None  # from the plan: its steady-state time per microbatch
    sequential_per_s: float | None = None  # the same requests one at a time, if measured

    @property
    def per_s(self) -> float:
        return self.items / self.seconds if self.seconds > 0 else float("inf")

    def line(self) -> str:
        text = f"throughput: {self.per_s:.1f} microbatches/s measured ({self.items} in {self.seconds:.3f} s)"
        if self.predicted_per_s:
            text += f", {self.predicted_per_s:.1f}/s predicted"
        if self.sequential_per_s:
            text += f", {self.sequential_per_s:.1f}/s one at a time"
        return text


def predicted_rate(plan: Plan | None) -> float | None:
    """Microbatches per second the plan predicts at steady state (slowest stage paces it)."""
    if plan is None:
        return None
    if plan.objective.pipelined and plan.predicted_ms > 0:
        return 1e3 / plan.predicted_ms
    slowest = max((p.predicted_ms for p in plan.partitions), default=0.0)
    return 1e3 / slowest if slowest > 0 else None


def measure_throughput(
    executor: Executor,
    batch: Sequence[Mapping[str, torch.Tensor]],
    plan: Plan | None = None,
    *,
    compare_sequential: bool = False,
) -> Throughput:
    """Push `batch` through `executor.run_many` (pipelined on Ray) and time it."""
    sequential = None
    if compare_sequential:
        t0 = time.perf_counter()
        for x in batch:
            executor.run(x)
        sequential = len(batch) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    executor.run_many(batch)
    seconds = time.perf_counter() - t0
    return Throughput(len(batch), seconds, predicted_rate(plan), sequential)
