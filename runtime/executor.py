"""The in-process executor: the same stages as the Ray deployment, run in list order in
this process. For one local box, for debugging, and for tests that need no cluster."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.errors import WorkerError
from hetero.partitioner.plan import Plan
from hetero.runtime.artifacts import load_runner
from hetero.runtime.metrics import RunMetrics
from hetero.runtime.stage import StageSpec, check_stages, producers, sources
from hetero.runtime.worker import Packet, StageRunner, caller_packet


class LocalExecutor:
    """Loads every stage's artifact once, then runs requests stage by stage."""

    def __init__(
        self,
        stages: Sequence[StageSpec],
        needed_outputs: Sequence[str],
        registry: BackendRegistry | None = None,
        *,
        plan: Plan | None = None,
    ) -> None:
        self.stages = tuple(stages)
        self.needed_outputs = tuple(needed_outputs)
        made_by = producers(self.stages)
        user_inputs = sorted({v for s in self.stages for v in s.inputs if v not in made_by})
        check_stages(self.stages, user_inputs, self.needed_outputs)
        self._sources = {s.index: sources(s, made_by) for s in self.stages}
        registry = registry or default_registry()
        self._runners = {
            s.index: StageRunner(s, load_runner(s.artifact, s.device, registry), s.device)
            for s in self.stages
        }
        self.metrics = RunMetrics(self.stages, plan)
        self._closed = False

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._closed:
            raise WorkerError("this executor was shut down; compile the model again")
        t0 = time.perf_counter()
        packets: dict[int, Packet] = {}
        first = caller_packet(inputs)
        for s in self.stages:
            ins = [first if src < 0 else packets[src] for src in self._sources[s.index]]
            packets[s.index] = self._runners[s.index](ins)
        out = _collect(self.needed_outputs, first, packets.values())
        for p in packets.values():
            self.metrics.record(p.records[p.src])
        self.metrics.record_request((time.perf_counter() - t0) * 1e3)
        return out

    def run_many(
        self, batch: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        return [self.run(x) for x in batch]

    def measured_ms(self) -> dict[int, float]:
        return self.metrics.measured_ms()

    def shutdown(self) -> None:
        self._runners.clear()
        self._closed = True

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _collect(
    needed: Sequence[str], first: Packet, packets: Sequence[Packet] | object
) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = dict(first.values)
    for p in packets:  # type: ignore[union-attr]
        values.update(p.values)
    missing = [n for n in needed if n not in values]
    if missing:
        raise WorkerError(f"the stages did not produce {missing}; the plan is incomplete")
    return {n: values[n] for n in needed}
