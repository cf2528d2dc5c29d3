"""Generation over Ray: one `GenerationWorker` actor per device holds that device's stages
of both phases, its resident weights and its layers' KV cache; each step is a chain of
actor calls, the activations passing through Ray's object store.

A worker's cache lives as long as the actor. A worker that dies mid-request loses it, and
the request fails with a WorkerError naming the device; the next request starts from its
prompt again (a generation is a fresh prefill each time, so nothing else depends on it).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from hetero.backends.eager import torch_device
from hetero.backends.library_ops import defining_modules, import_all
from hetero.backends.registry import BackendRegistry
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.errors import ConfigError, WorkerError
from hetero.partitioner.generation_plan import GenerationPlan
from hetero.partitioner.phases import PROMPT, START, LMGraphs, Phase
from hetero.runtime import faults, placement
from hetero.runtime.artifacts import unpack
from hetero.runtime.generation import Generation, StageBinder, lm_weights
from hetero.runtime.measured_choice import ProgramChoice
from hetero.runtime.metrics import MetricsSnapshot, RunMetrics
from hetero.runtime.stage import CALLER, StageSpec, producers, sources
from hetero.runtime.worker import Packet, StageRunner, caller_packet, local_device


def _weights_for(stages: Sequence[StageSpec], weights: Mapping[str, torch.Tensor]) -> dict:
    """Host copies of what `stages` bind: their params, and the full weights their split
    shares are cut from."""
    names = {n for s in stages for n in s.params}
    names |= {w for s in stages for group in s.shares for w in group.weights}
    return {n: weights[n].detach().cpu() for n in sorted(names) if n in weights}


@dataclass(frozen=True)
class StageRun:
    """Consecutive stages of one device that a step sends as one actor call: `members` as
    `GenerationWorker.run_run` takes them, `sources` the stages (or CALLER) whose packets
    the call receives, `last` the stage whose packet it returns."""

    device: str
    members: tuple[tuple[int, tuple[int, ...]], ...]
    sources: tuple[int, ...]
    last: int


def stage_runs(
    stages: Sequence[StageSpec], sources: Mapping[int, Sequence[int]], final: int
) -> tuple[StageRun, ...]:
    """The step's actor calls: consecutive stages of one device go as one call where every
    member but the last is read only by later members of the call (and is not the step's
    final stage), so that only the last one's packet leaves. A call's packet crosses the
    driver (~1.2 ms on the 2-core box), and the planner prices consecutive stages on one
    device with no hop between them."""
    readers: dict[int, set[int]] = {}
    for s in stages:
        for src in sources[s.index]:
            readers.setdefault(src, set()).add(s.index)
    blocks: list[list[StageSpec]] = []  # maximal runs of consecutive stages on one device
    for s in stages:
        if blocks and blocks[-1][-1].device.name == s.device.name:
            blocks[-1].append(s)
        else:
            blocks.append([s])
    runs: list[StageRun] = []
    for block in blocks:
        pos = {s.index: k for k, s in enumerate(block)}
        # inner[k]: block[k] may hand its values on inside a call (read only later in it)
        inner = [
            s.index != final
            and bool(readers.get(s.index))
            and all(pos.get(r, -1) > k for r in readers[s.index])
            for k, s in enumerate(block)
        ]
        i = 0
        while i < len(block):
            end, need, j = i, i, i
            while j < len(block) - 1 and inner[j]:
                need = max(need, *(pos[r] for r in readers[block[j].index]))
                j += 1
                if j >= need:
                    end = j
            runs.append(_as_run(block[i : end + 1], sources))
            i = end + 1
    return tuple(runs)


def _as_run(group: Sequence[StageSpec], sources: Mapping[int, Sequence[int]]) -> StageRun:
    pos = {s.index: k for k, s in enumerate(group)}
    outside: list[int] = []
    members = []
    for s in group:
        srcs = []
        for src in sources[s.index]:
            if src in pos and pos[src] < pos[s.index]:
                srcs.append(-1 - pos[src])
            else:
                if src not in outside:
                    outside.append(src)
                srcs.append(outside.index(src))
        members.append((s.index, tuple(srcs)))
    return StageRun(group[0].device.name, tuple(members), tuple(outside), group[-1].index)


class GenerationWorker:
    """One device's generation stages (both phases), weights and state."""

    def __init__(
        self,
        device: DeviceSpec,
        stages: Mapping[str, Sequence[StageSpec]],
        registry: BackendRegistry,
        weights: Mapping[str, torch.Tensor],
        blobs: Mapping[str, bytes] | None = None,
        imports: Sequence[str] = (),
    ) -> None:
        import_all(imports)  # the library operators the stages call (backends/library_ops.py)
        self.device = local_device(device)
        here = torch_device(self.device)
        self.binder = StageBinder(registry, device_of=lambda d: here)
        by_phase: dict[Phase, list[StageSpec]] = {}
        for phase, mine in stages.items():
            for s in mine:
                blob = (blobs or {}).get(s.artifact.key)
                art = unpack(s.artifact, blob) if blob is not None else s.artifact
                by_phase.setdefault(Phase(phase), []).append(replace(s, artifact=art))
        runners = self.binder.bind(by_phase, weights)
        self.stages = {
            (phase.value, s.index): StageRunner(s, runners[phase][s.index], self.device)
            for phase, mine in by_phase.items()
            for s in mine
        }
        self.started = time.time()
        self._width = torch.get_num_threads()  # the worker's team, as placement sized it

    def ready(self) -> dict[str, Any]:
        return {"device": self.device.name, "pid": os.getpid(), "started": self.started}

    def enter(self, phase: str) -> None:
        self.binder.enter(Phase(phase))

    def run(self, phase: str, index: int, *packets: Packet) -> Packet:
        return self.stages[(phase, index)](packets, True)

    def run_run(
        self, phase: str, members: Sequence[tuple[int, Sequence[int]]], *packets: Packet
    ) -> Packet:
        """Consecutive stages of this worker in one call (`stage_runs`): `members` are
        (stage index, its sources) in order, a source being a position in `packets` or
        -1 - k for the k-th member's packet. Between members the values stay on the device,
        as in-process; the last member's packet goes back (only it is read elsewhere)."""
        made: list[Packet] = []
        last = len(members) - 1
        for k, (index, srcs) in enumerate(members):
            ins = [packets[j] if j >= 0 else made[-1 - j] for j in srcs]
            made.append(self.stages[(phase, index)](ins, k == last))
        return made[-1]

    def settle(self, skip: Collection[str] = ()) -> None:
        self.binder.settle(skip)

    def program_choices(self) -> tuple[ProgramChoice, ...]:
        return self.binder.program_choices()

    def threads(self) -> int | None:
        """The width of the OpenMP team this worker's stages run on; None where they run
        on a GPU."""
        return self._width if torch_device(self.device).type == "cpu" else None

    def set_threads(self, threads: int) -> None:
        """The width of the team that runs this worker's host CPU decode stages from now on."""
        self.binder.decode_threads = threads

    def read_state(self, device: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: t.cpu() for n, t in self.binder.read_state(device, names).items()}

    def write_state(self, device: str, values: Mapping[str, torch.Tensor]) -> None:
        self.binder.write_state(device, values)


class RayGeneration(Generation):
    """Workers placed on the nodes that hold their devices; steps as chains of calls."""

    def __init__(
        self,
        lm: LMGraphs,
        plan: GenerationPlan,
        stages: Mapping[Phase, Sequence[StageSpec]],
        *,
        cluster: ClusterSpec,
        registry: BackendRegistry,
        timeout_s: float = 300.0,
        start_timeout_s: float = 300.0,
        max_restarts: int = 1,
    ) -> None:
        import ray  # optional heavy dependency

        if not ray.is_initialized():
            raise ConfigError(
                "Ray is not running in this process: call ray.init(address=...) first, or "
                "generate in this process (executor='local')"
            )
        super().__init__(lm, plan)
        self.stages = {phase: tuple(stages[phase]) for phase in Phase}
        self.timeout_s = timeout_s
        devices = list(dict.fromkeys(s.device for ss in self.stages.values() for s in ss))
        weights = lm_weights(lm)
        nodes = placement.alive_nodes()
        by_id = {n.node_id: n for n in nodes}
        host_node = placement.map_hosts(devices, nodes, {})
        shared = placement.sharing_cores(devices, host_node)
        actor = ray.remote(GenerationWorker)
        imports = tuple(
            dict.fromkeys(
                m for g in (lm.prefill, lm.decode) for m in defining_modules(g.program.graph)
            )
        )
        self.workers: dict[str, Any] = {}
        for d in devices:
            node = by_id[host_node[d.host]]
            mine = {
                phase.value: [s for s in self.stages[phase] if s.device.name == d.name]
                for phase in Phase
            }
            opts = placement.actor_options(
                d, node, max_restarts=max_restarts, shares_cores=d.name in shared
            )
            values = ray.put(_weights_for([s for ss in mine.values() for s in ss], weights))
            self.workers[d.name] = actor.options(**opts).remote(
                d, mine, registry, values, None, imports
            )
        ready, lost = faults.wait_ready(self.workers, start_timeout_s)
        if lost:
            self.shutdown()
            raise WorkerError(
                "generation workers did not start: "
                + "; ".join(f"{d}: {why}" for d, why in lost.items())
            )
        self.worker_info = ready
        self._sources = {
            phase: {s.index: sources(s, producers(ss)) for s in ss}
            for phase, ss in self.stages.items()
        }
        self._final = {
            phase: next(s.index for s in ss if set(s.outputs) & set(lm.graph(phase).outputs))
            for phase, ss in self.stages.items()
        }
        self._runs = {
            phase: stage_runs(ss, self._sources[phase], self._final[phase])
            for phase, ss in self.stages.items()
        }
        # each worker's packet carries the records of every stage upstream of it, so the
        # final one brings the step's times here without calling the actors again
        self.metrics = {phase: RunMetrics(self.stages[phase]) for phase in Phase}

    def step(self, phase: Phase, ids: torch.Tensor, start: int) -> torch.Tensor:
        import ray  # optional heavy dependency

        for w in self.workers.values():
            w.enter.remote(phase.value)  # a caller's calls to one actor run in order
        first = caller_packet({PROMPT: ids, START: torch.tensor(start, dtype=torch.long)})
        refs: dict[int, Any] = {}
        for run in self._runs[phase]:
            ins = [first if src == CALLER else refs[src] for src in run.sources]
            worker = self.workers[run.device]
            if len(run.members) == 1:
                refs[run.last] = worker.run.remote(phase.value, run.last, *ins)
            else:
                refs[run.last] = worker.run_run.remote(phase.value, run.members, *ins)
        try:
            packet = ray.get(refs[self._final[phase]], timeout=self.timeout_s)
        except Exception as e:
            raise faults.clean(faults.user_error(e) or e) from None
        for record in packet.records.values():
            self.metrics[phase].record(record)
        out = [o for o in self.lm.graph(phase).outputs if o]
        return packet.values[out[0]]

    def measured(self, phase: Phase) -> tuple[Sequence[StageSpec], MetricsSnapshot]:
        return self.stages[phase], self.metrics[phase].snapshot()

    def settle(self) -> None:
        import ray  # optional heavy dependency

        ray.get([w.settle.remote() for w in self.workers.values()], timeout=self.timeout_s)
        decoding = {s.device.name for s in self.stages[Phase.DECODE]}
        names = [d for d in self.workers if d in decoding]
        counts = ray.get([self.workers[d].threads.remote() for d in names], timeout=60)
        current = {d: n for d, n in zip(names, counts, strict=True) if n is not None}

        def apply(threads: Mapping[str, int]) -> None:
            calls = [self.workers[d].set_threads.remote(n) for d, n in threads.items()]
            ray.get(calls, timeout=60)

        self._choose_threads(current, apply)
        for metrics in self.metrics.values():  # the trials ran other programs and widths
            metrics.forget_runs()

    def program_choices(self) -> tuple[ProgramChoice, ...]:
        import ray  # optional heavy dependency

        made = ray.get([w.program_choices.remote() for w in self.workers.values()], timeout=60)
        return tuple(c for worker in made for c in worker)

    def settle_programs(self, skip: Collection[str]) -> None:
        import ray  # optional heavy dependency

        calls = [w.settle.remote(tuple(skip)) for w in self.workers.values()]
        ray.get(calls, timeout=self.timeout_s)
        for metrics in self.metrics.values():  # the trials ran other programs
            metrics.forget_runs()

    def move_state(self) -> None:
        import ray  # optional heavy dependency

        for move in self.plan.moves:
            values = self.workers[move.src].read_state.remote(move.src, move.state)
            ray.get(self.workers[move.dst].write_state.remote(move.dst, values), timeout=60)

    def shutdown(self) -> None:
        import ray  # optional heavy dependency

        self._closed = True
        for w in self.workers.values():
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(w, no_restart=True)
        self.workers = {}
