"""A device worker: owns one device, loads its stages' artifacts once, runs them on request.

`DeviceWorker` is a plain class; `placement.actor_class` wraps it as a Ray actor with
the device's resources. Its constructor does all loading, so when Ray restarts a dead
actor (max_restarts) the new process reloads the artifacts from the same arguments.

Between stages a `Packet` travels: the values a stage produced, who produced them,
when, and the measurements of every stage upstream, so the caller learns per-stage
times from the results alone.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.backends.gpu_cpu_mm import HandoffClock, settle
from hetero.backends.library_ops import import_all
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import DeviceSpec
from hetero.errors import WorkerError
from hetero.runtime.artifacts import unpack
from hetero.runtime.metrics import StageRecord, nbytes
from hetero.runtime.stage import CALLER, StageSpec
from hetero.runtime.streaming import load_runners


@dataclass(frozen=True)
class Packet:
    src: int  # the stage that produced `values` (CALLER for user inputs)
    values: Mapping[str, Any]
    records: Mapping[int, StageRecord]  # measurements of this and every upstream stage
    t_end: float  # time.time() when `values` were ready
    # In one process only (StageRunner(keep_on_device=True)): the GPU tensors `values` were
    # copied to the host from, for readers on that GPU. Never shipped: a Ray worker's
    # packets leave it without them.
    on_device: Mapping[str, Any] = field(default_factory=dict)


def caller_packet(inputs: Mapping[str, Any]) -> Packet:
    return Packet(CALLER, dict(inputs), {}, time.time())


def local_device(device: DeviceSpec) -> DeviceSpec:
    """The device as this process addresses it: Ray narrows CUDA_VISIBLE_DEVICES to the
    GPU it granted, so inside a GPU actor that GPU is cuda:0."""
    if device.kind != "gpu":
        return device
    try:
        import ray  # optional (hetero[ray]): loaded on first use

        if ray.is_initialized() and ray.get_gpu_ids():
            return replace(device, index=0)
    except ImportError:
        pass
    return device


# Runs of one stage whose GPU times may wait unread (`StageRunner.gpu_timed`): a caller
# that never reads them loses the oldest rather than holding events without end.
_UNREAD_RUNS = 8


class StageRunner:
    """Runs one stage from packets; shared by the Ray worker and the in-process executor.

    `gpu_timing`: a stage on a CUDA device is also timed by events on its stream, read by
    `gpu_timed`. A generation's runner queues a split layer's work and returns before the
    GPU (or the host CPU's share) has run it (backends/gpu_cpu_mm.py `overlapped`): the host
    clock then measures launches, and the feedback round would price the layers by them. The
    events measure the stage's span on the GPU's timeline, waits for the CPU's rows included.
    Each run has its own pair of events until it is read, so a caller may queue the next run
    before it reads this one's (`gpu_timed(..., wait=False)`): a decode step that waited for
    its own events left the GPU idle while the host sampled and launched the next."""

    def __init__(
        self,
        stage: StageSpec,
        runner: Any,
        device: DeviceSpec,
        *,
        gpu_timing: bool = False,
        keep_on_device: bool = False,
    ) -> None:
        """`keep_on_device`: the stage's readers run in this process; a value copied to the
        host for a reader on another device stays in the packet as the GPU tensor too, and
        a reader on that GPU takes it (`Packet.on_device`) rather than a copy back of the
        host's. In a decode step the first GPU stage's rotary tables and positions are read
        by every layer: with a CPU layer among them, each GPU layer uploaded its own four
        copies from the host, ~0.1 ms of launches and waits a layer."""
        self.stage = stage
        self.keep_on_device = keep_on_device
        self.runner = runner
        self.device = device
        cuda = device.kind == "gpu" and torch.cuda.is_available()
        self._cuda = torch.device("cuda", device.index or 0) if cuda else None
        self._times_gpu = gpu_timing and cuda
        # per run not yet read, by its record's id: (the record, its events, its hand-offs'
        # CPU span where a clock timed them); pairs are reused once read
        self._unread: dict[int, tuple[StageRecord, tuple, float | None]] = {}
        self._free: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        # a split stage's hand-offs, timed with it: the CPU's share as the step ran it
        self._handoffs = HandoffClock() if self._times_gpu else None
        self._handoffs_timed = False

    def gpu_timed(self, record: StageRecord, wait: bool = True) -> StageRecord | None:
        """`record` (a run of this stage) with its GPU span as its times, where timed;
        None where `wait` is False and the GPU has not reached the run's end yet."""
        entry = self._unread.get(id(record))
        if entry is None or entry[0] is not record:
            return record
        start, end = entry[1]
        if not wait and not end.query():
            return None
        del self._unread[id(record)]
        end.synchronize()
        ms = start.elapsed_time(end)
        self._free.append(entry[1])
        return replace(record, ms=ms, stage_ms=ms, cpu_rows_ms=entry[2])

    def _events(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if len(self._unread) >= _UNREAD_RUNS:  # a caller that never reads: the oldest go
            _, pair, _ = self._unread.pop(next(iter(self._unread)))
            self._free.append(pair)
        if self._free:
            return self._free.pop()
        return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def __call__(self, packets: Sequence[Packet], host_out: bool = True) -> Packet:
        s = self.stage
        start = time.time()
        began = time.perf_counter()
        values: dict[str, Any] = {}
        records: dict[int, StageRecord] = {}
        in_bytes: list[tuple[int, int]] = []
        waits: list[tuple[int, float]] = []
        wanted = set(s.inputs)
        for p in packets:
            if isinstance(p, BaseException):  # an upstream failure forwarded by the graph
                raise p
            values.update(p.values)
            if p.on_device and self._cuda is not None:
                values.update(
                    (n, v) for n, v in p.on_device.items() if n in wanted and v.device == self._cuda
                )
            records.update(p.records)
            in_bytes.append((p.src, nbytes(v for k, v in p.values.items() if k in wanted)))
            waits.append((p.src, max(0.0, (start - p.t_end) * 1e3)))
        missing = [n for n in s.inputs if n not in values]
        if missing:
            raise WorkerError(
                f"partition {s.name} on {s.device.name}: inputs {missing} did not arrive; "
                "the stage graph is wired wrong (a bug in hetero's runtime: please report it)"
            )
        pair = self._events() if self._times_gpu else None
        if pair is not None:
            pair[0].record(torch.cuda.current_stream(self._cuda))
        t0 = time.perf_counter()
        clock = self._handoffs
        self._handoffs_timed = clock is not None and clock.start(self._cuda)
        try:
            outs = self.runner(*[values[n] for n in s.inputs])
        except Exception as e:
            raise WorkerError(
                f"partition {s.name} ({s.backend}) failed on {s.device.name} "
                f"[pid {os.getpid()}]: {type(e).__name__}: {e}\n  What to do: run "
                "`hetero verify` on this config to find the op; check the inputs' shapes "
                "and dtypes against the ones the model was compiled for."
            ) from e
        finally:
            if clock is not None:
                clock.stop()
        ms = (time.perf_counter() - t0) * 1e3
        if len(outs) != len(s.outputs):
            raise WorkerError(
                f"partition {s.name} on {s.device.name} returned {len(outs)} values, its "
                f"artifact {s.artifact.key} declares {len(s.outputs)}: rebuild the artifact"
            )
        # Host copies for shared-memory channels keep their strides: a reader was compiled
        # for the strides of the eager run's values (the captured graph's views assume
        # them). NCCL sends `numel` elements from `data_ptr`, so a strided value would arrive
        # scrambled: it goes contiguous, and a reader whose views need the old strides then
        # fails loudly instead of computing on garbage.
        move = torch.Tensor.cpu if host_out else torch.Tensor.contiguous
        on_device: dict[str, torch.Tensor] = {}
        if host_out and self._cuda is not None:  # asleep while overlapped tasks multiply
            settle(self._cuda)
            if self.keep_on_device:
                on_device = {  # as they are: the host copies keep the same strides
                    n: o
                    for n, o in zip(s.outputs, outs, strict=True)
                    if isinstance(o, torch.Tensor) and o.device == self._cuda
                }
        outs = tuple(map_tensors(move, o) for o in outs)
        stage_ms = (time.perf_counter() - began) * 1e3
        record = StageRecord(s.index, ms, nbytes(outs), tuple(in_bytes), tuple(waits), stage_ms)
        if pair is not None:  # after the outputs' moves: their copies are the stage's
            pair[1].record(torch.cuda.current_stream(self._cuda))
            cpu = None
            if self._handoffs_timed:  # read now, its stream done: the next run reuses them
                pair[1].synchronize()
                cpu = self._handoffs.ms()
            self._unread[id(record)] = (record, pair, cpu)
        records[s.index] = record
        return Packet(
            s.index, dict(zip(s.outputs, outs, strict=True)), records, time.time(), on_device
        )


def map_tensors(fn: Callable[[torch.Tensor], Any], value: Any) -> Any:
    """`value` with `fn` applied to each tensor in it (an activation may be a tuple of
    tensors); a plain tensor, nearly every value, without pytree's walk (a few us each)."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return pytree.tree_map(lambda t: fn(t) if isinstance(t, torch.Tensor) else t, value)


def _fetch(blob: Any) -> bytes | None:
    if blob is None or isinstance(blob, bytes | bytearray):
        return blob
    import ray  # an ObjectRef: artifacts shipped through the object store

    return ray.get(blob, timeout=300)


class DeviceWorker:
    """One per device of the plan. Ray actor options come from `placement.actor_options`."""

    def __init__(
        self,
        device: DeviceSpec,
        stages: Sequence[StageSpec],
        blobs: Mapping[str, bytes] | None = None,
        registry: BackendRegistry | None = None,
        imports: Sequence[str] = (),
    ) -> None:
        """`imports`: modules that register the library operators the stages call
        (backends/library_ops.py), imported before anything loads."""
        import_all(imports)
        self.device = local_device(device)
        registry = registry if registry is not None else default_registry()
        self.started = time.time()
        self.stages: dict[int, StageRunner] = {}
        self.loaded_from: dict[int, str] = {}
        local = []
        for s in stages:
            blob = _fetch((blobs or {}).get(s.artifact.key))
            try:
                art = unpack(s.artifact, blob) if blob is not None else s.artifact
            except Exception as e:
                raise WorkerError(
                    f"worker for {device.name} could not unpack partition {s.name} "
                    f"({s.backend}, artifact {s.artifact.key}): {type(e).__name__}: {e}"
                ) from e
            self.loaded_from[s.index] = str(art.path)
            local.append(replace(s, artifact=art))
        try:
            # streamed stages of this device share one weight streamer, in stage order
            runners, self.streamers = load_runners(
                local, registry, {s.index: self.device for s in local}
            )
        except Exception as e:
            raise WorkerError(
                f"worker for {device.name} could not load partitions "
                f"{[s.name for s in local]} from {sorted(set(self.loaded_from.values()))}: "
                f"{type(e).__name__}: {e}"
            ) from e
        for s in local:
            self.stages[s.index] = StageRunner(s, runners[s.index], self.device)

    def ready(self) -> dict[str, Any]:
        node = ""
        try:
            import ray  # optional (hetero[ray]): loaded on first use

            node = ray.get_runtime_context().get_node_id()
        except Exception:
            pass
        return {
            "device": self.device.name,
            "node_id": node,
            "pid": os.getpid(),
            "stages": sorted(self.stages),
            "loaded_from": dict(self.loaded_from),
            "started": self.started,
        }

    def run(self, index: int, host_out: bool, *packets: Packet) -> Packet:
        return self.stages[index](packets, host_out)
