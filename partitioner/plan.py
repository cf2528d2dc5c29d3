"""Plan: which ops run where, through which backend, what moves between devices, and
what the cost model predicts. Frozen; JSON round trip with a schema version."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hetero.errors import ConfigError
from hetero.partitioner.decisions import Objective
from hetero.partitioner.draw import draw
from hetero.partitioner.explain import explain

SCHEMA_VERSION = 1
# on the compute device / in host memory, streamed in / shared by rows with the host CPU
WEIGHT_HOMES = ("resident", "streamed", "split")


class JsonFile:
    """JSON out (`to_json`, to a file when given a path) and in (`from_json`, text or a path)
    for a frozen dataclass with `to_dict` / `from_dict`."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Any:
        raise NotImplementedError

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> Any:
        p = Path(text_or_path) if not str(text_or_path).lstrip().startswith("{") else None
        return cls.from_dict(json.loads(p.read_text() if p is not None else str(text_or_path)))


@dataclass(frozen=True)
class BackendTiming:
    """One backend the measured choice tried on a partition: compiled, run on the partition's
    device with its real example inputs, checked against the eager run, timed."""

    backend: str
    ms: float | None  # the fastest round's time per call; None: not measured (`note` says why)
    note: str = ""  # why it was not measured or not eligible ("compile failed: ...")
    planned: bool = False  # the backend the cost model priced the partition's predicted_ms for


@dataclass(frozen=True)
class PlannedPartition:
    index: int
    nodes: tuple[str, ...]  # op names of the captured graph
    groups: tuple[str, ...]  # coarse groups (module paths) it covers
    device: str  # the device that computes it
    backend: str
    weights: str = "resident"  # resident | streamed (kept in host memory, copied in before use)
    predicted_ms: float = 0.0
    compute_ms: float = 0.0
    weight_stream_ms: float = 0.0
    flops: int = 0
    param_bytes: int = 0
    memory_bytes: int = (
        0  # on the compute device: resident params (or stream buffers) + activations
    )
    emulated: bool = False  # an NPU partition run through TVM on the host
    # weights == "split": per group, the share of each weight matrix's rows the GPU computes
    # (those rows streamed in); the host CPU computes the rest, in `cpu_dtype`
    split: tuple[tuple[str, float], ...] = ()
    # weights == "split": per group whose matmuls are not all shared, the weights it streams
    # whole to the GPU instead (no hand-off for them: partitioner/gpu_cpu_split.split_cost)
    split_whole: tuple[tuple[str, tuple[str, ...]], ...] = ()
    # the dtype the host CPU computes its work in where not the model's own (a split's CPU
    # rows, or a whole CPU partition: partitioner/host_dtype.py)
    cpu_dtype: str = ""
    group_sizes: tuple[int, ...] = ()  # ops of each of `groups`, in order (`nodes` cut by group)
    state_bytes: int = 0  # buffers it updates in place (a KV cache), held on its device
    # The measured backend choice (runtime/choice.py): every backend tried, the chosen one
    # (`backend`) first, then the others fastest first; empty when the backend was fixed
    # (pinned, `choose: fixed`, or the only one for the device kind).
    choice: tuple[BackendTiming, ...] = ()
    choice_cached: bool = False  # the times come from an earlier compile's record
    # weights == "split": the host's side of one run with the weights at hand (the GPU's
    # work, the hand-offs, the CPU's rows beyond it) and its hand-offs: what a measured run
    # is compared with (calibration/generation.py)
    host_ms: float = 0.0
    handoffs: int = 0
    cpu_ms: float = 0.0  # weights == "split": the CPU's rows at their calibrated rate

    @property
    def measured_choice_ms(self) -> float | None:
        """The chosen backend's measured time (None when not chosen by measurement)."""
        return self.choice[0].ms if self.choice else None


@dataclass(frozen=True)
class Transfer:
    src: int  # partition index; -1 is the caller (inputs) / the result (outputs)
    dst: int
    values: tuple[str, ...]
    bytes: int
    src_device: str
    dst_device: str
    links: tuple[str, ...] = ()  # "a<->b (kind)" along the route
    predicted_ms: float = 0.0


@dataclass(frozen=True)
class Rejection:
    """Why a node (or group) was kept off a device: shown by explain()."""

    node: str
    device: str
    reason: str  # "unsupported: ...", "memory: ...", "pinned to ...", "excluded"


@dataclass(frozen=True)
class Plan(JsonFile):
    model: str
    cluster: str
    objective: Objective
    algorithm: str
    partitions: tuple[PlannedPartition, ...]
    transfers: tuple[Transfer, ...] = ()
    predicted_ms: float = 0.0  # one request end to end (latency) or per microbatch at steady state
    microbatches: int = 1
    rejections: tuple[Rejection, ...] = ()
    memory: tuple[tuple[str, int], ...] = ()  # device -> bytes planned on it
    measured_ms: tuple[tuple[int, float], ...] = ()  # partition index -> measured, once run
    schema_version: int = SCHEMA_VERSION
    notes: tuple[str, ...] = field(default=())
    method: str = ""  # how the planner found it, e.g. "stage DP over device classes"
    optimal: bool = False  # proven optimal for the planner's model (not only the best found)

    def __post_init__(self) -> None:
        # A Plan is built by people and read from JSON too: "latency" becomes the enum here.
        object.__setattr__(self, "objective", Objective.parse(self.objective, "plan objective"))

    # ---- lookups ---------------------------------------------------------------------------
    def assignment(self) -> dict[str, int]:
        """op name -> partition index, the input `partitioner.split` takes."""
        return {n: p.index for p in self.partitions for n in p.nodes}

    def devices(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(p.device for p in self.partitions))

    def partition(self, index: int) -> PlannedPartition:
        for p in self.partitions:
            if p.index == index:
                return p
        raise KeyError(index)

    def with_measured(self, measured: Mapping[int, float]) -> Plan:
        return replace(self, measured_ms=tuple(sorted(measured.items())))

    # ---- JSON --------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ConfigError(
                f"plan schema version {version!r} is not {SCHEMA_VERSION}; re-run `hetero plan`"
            )
        d = dict(d)
        d["partitions"] = tuple(
            PlannedPartition(
                **{
                    **p,
                    "nodes": tuple(p["nodes"]),
                    "groups": tuple(p["groups"]),
                    "split": tuple((g, float(f)) for g, f in p.get("split", ())),
                    "split_whole": tuple((g, tuple(ws)) for g, ws in p.get("split_whole", ())),
                    "group_sizes": tuple(p.get("group_sizes", ())),
                    "choice": tuple(BackendTiming(**c) for c in p.get("choice", ())),
                }
            )
            for p in d["partitions"]
        )
        d["transfers"] = tuple(
            Transfer(**{**t, "values": tuple(t["values"]), "links": tuple(t["links"])})
            for t in d["transfers"]
        )
        d["rejections"] = tuple(Rejection(**r) for r in d["rejections"])
        d["memory"] = tuple((k, int(v)) for k, v in d["memory"])
        d["measured_ms"] = tuple((int(k), float(v)) for k, v in d["measured_ms"])
        d["notes"] = tuple(d.get("notes", ()))
        return cls(**d)

    # ---- for people ----------------------------------------------------------------------------
    def explain(self, width: int = 120) -> str:
        """Tables: partitions, transfers, memory, ops kept off devices and why, notes."""

        return explain(self, width=width)

    def draw(self, path: str | Path) -> Path:
        return draw(self, path)
