"""What running deployments measured, as data: the input of feedback calibration.

The runtime reports times per stage and per hop (runtime/metrics.py); the layer that knows
the plan turns them into these records, each carrying the base cost model's prediction cut
into the terms the fit corrects (op class and shape bucket); `hetero.calibration.feedback`
folds a `RunLog` into a `CalibrationProfile`. Frozen values and their JSON, no torch, so a
log written by one deployment is read by `hetero calibrate --from-runs` anywhere.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hetero.errors import ConfigError

RUNLOG_SCHEMA_VERSION = 1
EXECUTORS = ("local", "ray")  # the runtimes that report: in-process, Ray actors


@dataclass(frozen=True)
class Term:
    """Part of a partition's predicted time: the groups of one op class and shape bucket."""

    op_class: str  # the group's main op class (coarsen: the anchor class most of its ops are)
    bucket: int  # shape bucket: log4 of its roofline microseconds at datasheet peaks
    seconds: float  # what the base cost model predicts for them (no feedback corrections)


@dataclass(frozen=True)
class PartitionRun:
    """One partition of one plan, run `runs` times by an executor."""

    device: str  # device name in the cluster
    model: str  # the device's model string (matches another cluster's same device)
    kind: str
    backend: str
    executor: str  # one of EXECUTORS
    runs: int
    measured_s: float  # median runner call, inputs on the device
    stage_s: float  # median whole stage on its worker: inputs gathered -> outputs ready
    predicted_s: float  # the plan's prediction when it ran (corrections then in force)
    terms: tuple[Term, ...]
    call_s: float  # the base model's cost of calling the partition (no stage overhead)
    label: str = ""  # "tiny_gpt/p0", for people

    @property
    def base_s(self) -> float:
        """What the base cost model predicts (its terms and the call, no corrections)."""
        return sum(t.seconds for t in self.terms) + self.call_s


@dataclass(frozen=True)
class HopRun:
    """Activations moving between two stages' workers (or from the caller), `runs` times."""

    src: str  # device name; the caller's device for user inputs
    dst: str
    executor: str
    runs: int
    bytes: int  # per run
    measured_s: float  # median: producer's values ready -> consumer starts
    link_s: float  # the base model's link time (latency + bytes / bandwidth), no hop overhead
    caller: bool = False  # from the caller (a driver process), not from another stage


@dataclass(frozen=True)
class RunLog:
    """Records of one or more deployments of models on one cluster (JSON on disk)."""

    cluster: str
    partitions: tuple[PartitionRun, ...] = ()
    hops: tuple[HopRun, ...] = ()
    host: str = field(default_factory=platform.node)
    created: float = field(default_factory=time.time)
    schema_version: int = RUNLOG_SCHEMA_VERSION

    def __add__(self, other: RunLog) -> RunLog:
        if other.cluster != self.cluster:
            raise ConfigError(
                f"run logs of clusters {self.cluster!r} and {other.cluster!r} do not mix: "
                "fold each into its own cluster's profile"
            )
        return replace(
            self,
            partitions=self.partitions + other.partitions,
            hops=self.hops + other.hops,
            created=max(self.created, other.created),
        )

    @classmethod
    def merge(cls, cluster: str, logs: Iterable[RunLog]) -> RunLog:
        out = cls(cluster)
        for log in logs:
            out = out + log
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> RunLog:
        if d.get("schema_version") != RUNLOG_SCHEMA_VERSION:
            raise ConfigError(
                f"{source}: run log schema {d.get('schema_version')!r} is not "
                f"{RUNLOG_SCHEMA_VERSION}; write it again with this hetero (CompiledModel.run_log())"
            )
        try:
            parts = tuple(
                PartitionRun(**{**p, "terms": tuple(Term(**t) for t in p.get("terms", ()))})
                for p in d.get("partitions", ())
            )
            hops = tuple(HopRun(**h) for h in d.get("hops", ()))
            rest = {k: v for k, v in d.items() if k not in ("partitions", "hops")}
            return cls(partitions=parts, hops=hops, **rest)
        except TypeError as e:
            raise ConfigError(f"{source}: not a hetero run log ({e})") from None

    @classmethod
    def load(cls, path: str | Path) -> RunLog:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the run log ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: run log is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(p))
