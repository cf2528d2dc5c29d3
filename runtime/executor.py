"""The in-process executor: the same stages as the Ray deployment, run in list order in
this process. For one local box, for debugging, and for tests that need no cluster.

Values stay on their device between stages of one device (a GPU's activations never
round-trip through host memory, which would also stall the CPU and with it the weight
prefetch of streamed stages); they go to the host where a stage on another device reads
them. Results go where the caller's inputs came from: host inputs give host results (a
GPU model's outputs copied back), CUDA inputs keep CUDA results on the GPU."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.errors import WorkerError
from hetero.partitioner.plan import Plan
from hetero.runtime.metrics import RunMetrics
from hetero.runtime.stage import StageSpec, check_stages, producers, sources
from hetero.runtime.streaming import load_runners
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
        stream_runner: str = "auto",
        runners: Mapping[int, Any] | None = None,
    ) -> None:
        """`stream_runner`: how stages with streamed weights run: "auto" (torch.compile on
        CUDA, eager elsewhere), "eager" or "inductor" (runtime/streaming.py). `runners`:
        stage index -> a runner built by the caller (a generation binds its own), instead of
        loading each stage's artifact here."""
        self.stages = tuple(stages)
        self.needed_outputs = tuple(needed_outputs)
        made_by = producers(self.stages)
        user_inputs = sorted({v for s in self.stages for v in s.inputs if v not in made_by})
        check_stages(self.stages, user_inputs, self.needed_outputs)
        self._sources = {s.index: sources(s, made_by) for s in self.stages}
        if runners is None:
            registry = registry or default_registry()
            runners, self.streamers = load_runners(
                self.stages, registry, stream_runner=stream_runner
            )
        else:
            self.streamers = {}
        self._runners = {s.index: StageRunner(s, runners[s.index], s.device) for s in self.stages}
        readers: dict[int, set[str]] = {}
        for s in self.stages:
            for src in self._sources[s.index]:
                readers.setdefault(src, set()).add(s.device.name)
        self._host_out = {
            s.index: bool(readers.get(s.index, set()) - {s.device.name}) for s in self.stages
        }
        self.metrics = RunMetrics(self.stages, plan)
        # A stage's values are dropped after their last reader ran (unless they hold a
        # result): a streamed partition is one stage per layer, and keeping every layer's
        # hidden states to the end of the request put prefill 97 MB over a GPU memory cap.
        self._last_reader = {
            src: s.index for s in self.stages for src in self._sources[s.index] if src >= 0
        }
        needed = set(self.needed_outputs)
        self._keep = {s.index for s in self.stages if needed & set(s.outputs)}
        self._closed = False

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._closed:
            raise WorkerError("this executor was shut down; compile the model again")
        t0 = time.perf_counter()
        packets: dict[int, Packet] = {}
        done = []  # records of the stages whose values were dropped
        first = caller_packet(inputs)
        for s in self.stages:
            ins = [first if src < 0 else packets[src] for src in self._sources[s.index]]
            packets[s.index] = self._runners[s.index](ins, self._host_out[s.index])
            for src in self._sources[s.index]:
                if self._last_reader.get(src) == s.index and src not in self._keep:
                    p = packets.pop(src)
                    done.append(p.records[p.src])
        home = _home(inputs)
        out = _collect(self.needed_outputs, first, packets.values(), home)
        for record in [*done, *(p.records[p.src] for p in packets.values())]:
            self.metrics.record(record)
        self.metrics.record_request((time.perf_counter() - t0) * 1e3)
        return out

    def run_many(
        self, batch: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        return [self.run(x) for x in batch]

    def measured_ms(self) -> dict[int, float]:
        """Mean measured ms per plan partition (a streamed partition's pieces summed)."""
        out: dict[int, float] = {}
        plan_index = {s.index: s.plan_index for s in self.stages}
        for i, ms in self.metrics.measured_ms().items():
            k = plan_index.get(i, i)
            out[k] = out.get(k, 0.0) + ms
        return out

    def shutdown(self) -> None:
        self._runners.clear()
        self.streamers.clear()
        self._closed = True

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _home(inputs: Mapping[str, object]) -> torch.device:
    """The device the caller's tensors are on (the host when they differ or there are none)."""
    devices = {
        t.device for t in pytree.tree_leaves(list(inputs.values())) if isinstance(t, torch.Tensor)
    }
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def _collect(
    needed: Sequence[str],
    first: Packet,
    packets: Sequence[Packet] | object,
    home: torch.device = torch.device("cpu"),
) -> dict[str, torch.Tensor]:
    values: dict[str, torch.Tensor] = dict(first.values)
    for p in packets:  # type: ignore[union-attr]
        values.update(p.values)
    missing = [n for n in needed if n not in values]
    if missing:
        raise WorkerError(f"the stages did not produce {missing}; the plan is incomplete")
    return {
        n: pytree.tree_map(lambda v: v.to(home) if isinstance(v, torch.Tensor) else v, values[n])
        for n in needed
    }
