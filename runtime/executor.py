"""The in-process executor: the same stages as the Ray deployment, run in list order in
this process. For one local box, for debugging, and for tests that need no cluster.

Values stay on their device between stages of one device (a GPU's activations never
round-trip through host memory, which would also stall the CPU and with it the weight
prefetch of streamed stages); they go to the host where a stage on another device reads
them. Results go where the caller's inputs came from: host inputs give host results (a
GPU model's outputs copied back), CUDA inputs keep CUDA results on the GPU."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.errors import WorkerError
from hetero.partitioner.plan import Plan
from hetero.runtime.metrics import RunMetrics, StageRecord
from hetero.runtime.online import OnlineReplanner
from hetero.runtime.replan import StagedPlan, log_switch
from hetero.runtime.stage import StageSpec, check_stages, producers, sources
from hetero.runtime.streaming import load_runners
from hetero.runtime.worker import Packet, StageRunner, caller_packet, map_tensors


@dataclass
class _Installed:
    """One deployment's loaded stages and wiring. A request reads it once, so a switch to
    another deployment (online re-planning) never changes the stages under a running one."""

    deployment: StagedPlan
    runners: dict[int, StageRunner]
    streamers: dict[str, Any]
    sources: dict[int, tuple[int, ...]]
    host_out: dict[int, bool]
    last_reader: dict[int, int]
    keep: set[int]
    metrics: RunMetrics
    structure: tuple = field(default=())  # (index, device, artifact key) per stage


def _structure(stages: Sequence[StageSpec]) -> tuple:
    return tuple((s.index, s.device.name, s.artifact.key) for s in stages)


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
        online: OnlineReplanner | None = None,
        gpu_timing: bool = False,
        outputs_where_made: bool = False,
    ) -> None:
        """`stream_runner`: how stages with streamed weights run: "auto" (torch.compile on
        CUDA, eager elsewhere), "eager" or "inductor" (runtime/streaming.py). `runners`:
        stage index -> a runner built by the caller (a generation binds its own), instead of
        loading each stage's artifact here. `online`: re-plans when measured stage times
        leave the plan's predictions behind (runtime/online.py); the executor switches to
        what it hands over between requests. `gpu_timing`: CUDA stages are timed on the
        GPU's timeline (runtime/worker.py `StageRunner`; a generation's, whose split layers
        return before their work has run). `outputs_where_made`: each output is handed back
        on the device whose stage made it, not moved to the caller's inputs' device (a
        generation in this process samples its next token on the GPU that made the logits:
        moving them to the host cost each decode step a copy, a wait and a float16 argmax on
        the CPU)."""
        self.needed_outputs = tuple(needed_outputs)
        self.outputs_where_made = outputs_where_made
        self.gpu_timing = gpu_timing
        self.registry = registry
        self.stream_runner = stream_runner
        self.online = online
        self.history: list[StagedPlan] = []  # earlier deployments, oldest first
        self.served = 0  # requests answered, all deployments
        self._closed = False
        # (metrics, runner, record) of runs whose stage's GPU has not reached their end: a
        # generation queues its next step before it reads this one's token
        self._unread: list[tuple[RunMetrics, StageRunner, StageRecord]] = []
        self._state = self._install(StagedPlan(tuple(stages), plan), runners)

    # ---- the running deployment -----------------------------------------------------------
    @property
    def deployment(self) -> StagedPlan:
        return self._state.deployment

    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return self._state.deployment.stages

    @property
    def metrics(self) -> RunMetrics:
        """The runs' measurements, every run's GPU times read (waiting for them)."""
        self._read_gpu_times(wait=True)
        return self._state.metrics

    def _read_gpu_times(self, wait: bool) -> None:
        """Records the runs whose GPU times were unread, as far as the GPU has reached (all
        of them, waiting, where `wait`), in the order they ran."""
        left = []
        for metrics, runner, record in self._unread:
            timed = runner.gpu_timed(record, wait=wait)
            if timed is None:
                left.append((metrics, runner, record))
            else:
                metrics.record(timed)
        self._unread = left

    @property
    def streamers(self) -> dict[str, Any]:
        return self._state.streamers

    def runner(self, index: int) -> Any:
        """What runs stage `index` (a backend's runner, or a generation's bound runner)."""
        return self._state.runners[index].runner

    def _install(
        self,
        deployment: StagedPlan,
        runners: Mapping[int, Any] | None = None,
        previous: _Installed | None = None,
    ) -> _Installed:
        stages = deployment.stages
        made_by = producers(stages)
        user_inputs = sorted({v for s in stages for v in s.inputs if v not in made_by})
        check_stages(stages, user_inputs, self.needed_outputs)
        src_of = {s.index: sources(s, made_by) for s in stages}
        replans = previous.metrics.replans if previous is not None else []
        if previous is not None and previous.structure == _structure(stages):
            # the same stages with other predictions: keep the loaded runners and the runs
            previous.metrics.stages, previous.metrics.plan = stages, deployment.plan
            return _Installed(
                deployment,
                {i: self._runner(s, previous.runners[i].runner) for i, s in _by(stages)},
                previous.streamers,
                previous.sources,
                previous.host_out,
                previous.last_reader,
                previous.keep,
                previous.metrics,
                previous.structure,
            )
        streamers: dict[str, Any] = {}
        if runners is None:
            registry = self.registry or default_registry()
            runners, streamers = load_runners(stages, registry, stream_runner=self.stream_runner)
        readers: dict[int, set[str]] = {}
        for s in stages:
            for src in src_of[s.index]:
                readers.setdefault(src, set()).add(s.device.name)
        needed = set(self.needed_outputs)
        return _Installed(
            deployment,
            {s.index: self._runner(s, runners[s.index]) for s in stages},
            streamers,
            src_of,
            {s.index: bool(readers.get(s.index, set()) - {s.device.name}) for s in stages},
            # A stage's values are dropped after their last reader ran (unless they hold a
            # result): a streamed partition is one stage per layer, and keeping every layer's
            # hidden states to the end of the request put prefill 97 MB over a GPU memory cap.
            {src: s.index for s in stages for src in src_of[s.index] if src >= 0},
            {s.index for s in stages if needed & set(s.outputs)},
            RunMetrics(stages, deployment.plan, replans=replans),
            _structure(stages),
        )

    def _runner(self, s: StageSpec, runner: Any) -> StageRunner:
        return StageRunner(s, runner, s.device, gpu_timing=self.gpu_timing, keep_on_device=True)

    def switch(self, deployment: StagedPlan) -> None:
        """Run `deployment` from the next request on (requests running now finish on the
        stages they started with). The same stages with new predictions keep their runs."""
        before = self._state
        after = self._install(deployment, previous=before)
        if after.structure != before.structure:
            self.history.append(before.deployment)
            log_switch(
                {},
                before.deployment,
                deployment,
                why="measured times left the plan's predictions behind",
            )
        self._state = after

    def _take_online(self) -> None:
        if self.online is None:
            return
        offer = self.online.take(self.served)
        if offer is None:
            return
        deployment, event = offer
        try:
            self.switch(deployment)
        except Exception as e:  # the running deployment keeps serving
            event = dataclasses.replace(event, outcome=f"failed: {type(e).__name__}: {e}"[:300])
        self.metrics.record_replan(event)

    # ---- requests ---------------------------------------------------------------------------
    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._closed:
            raise WorkerError("this executor was shut down; compile the model again")
        self._take_online()
        state = self._state
        t0 = time.perf_counter()
        packets: dict[int, Packet] = {}
        done = []  # records of the stages whose values were dropped
        first = caller_packet(inputs)
        for s in state.deployment.stages:
            ins = [first if src < 0 else packets[src] for src in state.sources[s.index]]
            packets[s.index] = state.runners[s.index](ins, state.host_out[s.index])
            for src in state.sources[s.index]:
                if state.last_reader.get(src) == s.index and src not in state.keep:
                    p = packets.pop(src)
                    done.append(p.records[p.src])
        home = None if self.outputs_where_made else _home(inputs)
        out = _collect(self.needed_outputs, first, packets.values(), home)
        for record in [*done, *(p.records[p.src] for p in packets.values())]:
            runner = state.runners.get(record.index)
            if runner is None:
                state.metrics.record(record)
            else:
                self._unread.append((state.metrics, runner, record))
        self._read_gpu_times(wait=False)
        state.metrics.record_request((time.perf_counter() - t0) * 1e3)
        self.served += 1
        if self.online is not None and state is self._state:
            self.online.after_request(state.deployment, state.metrics, self.served)
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
        if self.online is not None:
            self.online.close()
        self._unread.clear()
        self._state.runners.clear()
        self._state.streamers.clear()
        self._closed = True

    def __enter__(self) -> LocalExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def _by(stages: Sequence[StageSpec]) -> list[tuple[int, StageSpec]]:
    return [(s.index, s) for s in stages]


def _home(inputs: Mapping[str, object]) -> torch.device:
    """The device the caller's tensors are on (the host when they differ or there are none)."""
    values = list(inputs.values())
    if not all(isinstance(v, torch.Tensor) for v in values):
        values = pytree.tree_leaves(values)
    devices = {t.device for t in values if isinstance(t, torch.Tensor)}
    return devices.pop() if len(devices) == 1 else torch.device("cpu")


def _collect(
    needed: Sequence[str],
    first: Packet,
    packets: Sequence[Packet] | object,
    home: torch.device | None = torch.device("cpu"),
) -> dict[str, torch.Tensor]:
    """The `needed` values, moved to `home` (None: where they are)."""
    values: dict[str, torch.Tensor] = dict(first.values)
    for p in packets:  # type: ignore[union-attr]
        values.update(p.values)
    missing = [n for n in needed if n not in values]
    if missing:
        raise WorkerError(f"the stages did not produce {missing}; the plan is incomplete")
    if home is None:
        return {n: values[n] for n in needed}
    return {n: map_tensors(lambda t: t.to(home), values[n]) for n in needed}
