"""Calibration profiles: what `hetero calibrate` measured on a cluster's devices, as data.

Part of the cluster's description (how fast its devices really are, per backend), so it
lives at the bottom with the spec: frozen values and their JSON, no torch. The cost model
(partitioner/cost.py) reads them; calibration (hetero.calibration) writes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from hetero.cluster.devices import DeviceSpec
from hetero.errors import ConfigError
from hetero.paths import profile_path

PROFILE_SCHEMA_VERSION = 3
# Schema 1 had no backend field: its entries measured torch eager ops, and read as such.
# Schema 2 had no feedback (corrections, runtime): read as none folded in yet.
_READABLE_SCHEMAS = (1, 2, 3)


def default_profile_path(cluster_name: str) -> Path:
    """Where a cluster's profile is cached (plans of that cluster find it there)."""
    return profile_path(cluster_name)


@dataclass(frozen=True)
class Efficiency:
    key: str  # "matmul" or "matmul/float32"
    compute: float  # achieved / peak FLOP/s
    memory: float  # achieved / peak bytes/s
    error: float = 0.0  # mean |relative error| of the fit over its microbenchmarks
    samples: int = 0
    overhead: float | None = None  # seconds per op of this class (dispatch + launch), fitted


@dataclass(frozen=True)
class DeviceProfile:
    """What one device measured through one backend: (device, backend) is the entry's key,
    because the same op costs different times as eager torch, a TVM kernel or a Triton one."""

    device: str  # name in the cluster it was measured for
    kind: str
    model: str = ""
    peak_flops: float = 0.0  # the float32 peak the factors are relative to (for people)
    mem_bandwidth: float = 0.0
    launch_overhead: float | None = None  # seconds per op dispatch, measured
    view_overhead: float | None = None  # seconds per view op in eager, measured
    # What the backend's runner adds to each op over the bare torch call the per-class
    # overheads were fitted on (eager: an OpOverload call from the program's Python code).
    runner_overhead: float = 0.0
    efficiency: tuple[Efficiency, ...] = ()
    call_overhead: float | None = None  # seconds to call one partition (fx module), measured
    backend: str = "eager"  # what compiled and ran the microbenchmarks
    threads: int = 0  # CPU threads they ran with (0: not recorded)
    # A fused group's time inside a partition over its time alone (a whole compiled block
    # measured against the sum of its groups' predictions; kernels run back to back hand the
    # cores between thread pools and share caches). 1.0: not measured.
    sequence_factor: float = 1.0
    # The backend's versions when measured ("name=version ..."): a new lowering changes what
    # the factors describe, so re-calibrate when this differs from the backend's versions().
    backend_versions: str = ""


@dataclass(frozen=True)
class LinkProfile:
    a: str
    b: str
    bandwidth: float  # bytes/s, measured
    latency: float  # seconds, measured
    # (dtype, bytes/s) while the host CPU reads host memory too, running matmuls in that
    # dtype (a split layer's rows, a CPU layer beside a streamed one): the two share the
    # host's memory, and float32 rows read faster and leave the link less (an H100 host:
    # 40.9 GB/s beside float32, 49.5 beside float16). Empty: not measured.
    shared_by_dtype: tuple[tuple[str, float], ...] = ()

    def shared_rate(self, beside: str = "") -> float:
        """bytes/s beside the host CPU's work in dtype `beside` (another or "": the slowest
        measured; none measured: `bandwidth`)."""
        rates = dict(self.shared_by_dtype)
        return rates.get(beside) or min(rates.values(), default=self.bandwidth)


# Keys of a Correction besides "<op class>@<bucket>" and "<op class>":
ALL_CLASSES = "*"  # every group of the device whose own class and bucket were not measured
CALL = "call"  # the partition call (the profile's `call_overhead`, or its default)


@dataclass(frozen=True)
class Correction:
    """A factor on the cost model's time for the groups of one (device, backend) and key,
    fitted to what running deployments measured (`hetero calibrate --from-runs`, or live
    with `hetero.compile(feedback=True)`): measured / predicted, by shape bucket."""

    device: str
    backend: str
    key: str  # "matmul@5" (op class @ shape bucket), "matmul", ALL_CLASSES or CALL
    factor: float
    samples: int = 0  # partition runs behind it
    error: float = 0.0  # median |relative error| of the fitted partitions after the fit
    model: str = ""  # the device's model string (another cluster's same device matches it)


@dataclass(frozen=True)
class RuntimeProfile:
    """What an executor adds around the partitions, measured on running deployments."""

    executor: str  # "local" (in-process) or "ray" (actors joined by a compiled graph)
    stage_overhead: float  # s per stage run beyond the runner's call (inputs, copies, records)
    hop_overhead: float  # s per hop between devices beyond the link's time (channel, pickling)
    samples: int = 0
    # s per hand-off of a `split` layer beyond its copies and the op's call: the compiled
    # program's host work between hand-offs, measured from running generations
    split_handoff: float = 0.0
    # s per call of a streamed piece beyond its priced call: the compiled program's host work
    # (launches, guards), on a decode step's critical path between CPU layers
    stream_call: float = 0.0
    # s per s of a split layer's CPU rows beyond their calibrated time: inside a decode step
    # the host's products ran slower than the microbenchmark measures them alone (an H200
    # run: the split LM head's rows at ~28 GB/s against 57 calibrated beside the link)
    split_cpu: float = 0.0


@dataclass(frozen=True)
class CalibrationProfile:
    """Measured efficiency factors for the devices of one cluster (JSON on disk)."""

    cluster: str
    devices: tuple[DeviceProfile, ...] = ()
    links: tuple[LinkProfile, ...] = ()
    # folded in from measured runs (calibration/feedback.py); the factors above stay as
    # the microbenchmarks fitted them
    corrections: tuple[Correction, ...] = ()
    runtime: tuple[RuntimeProfile, ...] = ()
    host: str = ""
    torch_version: str = ""
    created: float = field(default_factory=time.time)
    schema_version: int = PROFILE_SCHEMA_VERSION

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(asdict(self), indent=2)
        if path is not None:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(text)
        return text

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str = "<dict>") -> CalibrationProfile:
        version = d.get("schema_version")
        if version not in _READABLE_SCHEMAS:
            raise ConfigError(
                f"{source}: calibration profile schema {version!r} is not one this hetero reads "
                f"({', '.join(map(str, _READABLE_SCHEMAS))}); re-run `hetero calibrate`"
            )
        try:
            devices = tuple(
                DeviceProfile(
                    **{
                        **dp,
                        "efficiency": tuple(Efficiency(**e) for e in dp.get("efficiency", ())),
                    }
                )
                for dp in d.get("devices", ())
            )
            links = tuple(
                LinkProfile(
                    **{
                        **lp,
                        "shared_by_dtype": tuple(
                            (str(k), float(v)) for k, v in lp.get("shared_by_dtype", ())
                        ),
                    }
                )
                for lp in d.get("links", ())
            )
            corrections = tuple(Correction(**c) for c in d.get("corrections", ()))
            runtime = tuple(RuntimeProfile(**r) for r in d.get("runtime", ()))
            nested = ("devices", "links", "corrections", "runtime")
            rest = {k: v for k, v in d.items() if k not in nested}
            rest["schema_version"] = PROFILE_SCHEMA_VERSION  # read as (upgraded to) the current
            return cls(
                devices=devices, links=links, corrections=corrections, runtime=runtime, **rest
            )
        except TypeError as e:
            raise ConfigError(
                f"{source}: not a calibration profile ({e}); re-run `hetero calibrate`"
            ) from None

    @classmethod
    def load(cls, path: str | Path) -> CalibrationProfile:
        p = Path(path)
        try:
            data = json.loads(p.read_text())
        except OSError as e:
            raise ConfigError(f"{p}: cannot read the calibration profile ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: calibration profile is not valid JSON: {e}") from None
        return cls.from_dict(data, source=str(p))

    def for_device(self, device: DeviceSpec, backend: str | None = None) -> DeviceProfile | None:
        """The entry measured for this device: same name, else same model, else same kind;
        measured through `backend` first, and only when none was, through another backend
        (better than datasheet defaults; `backends_of` tells which ones exist)."""
        matches = (
            lambda dp: dp.device == device.name,
            lambda dp: bool(device.model) and dp.model == device.model,
            lambda dp: dp.kind == device.kind,
        )
        passes = (True, False) if backend is not None else (False,)
        for same_backend in passes:
            for match in matches:
                for dp in self.devices:
                    if match(dp) and (not same_backend or dp.backend == backend):
                        return dp
        return None

    def backends_of(self, device: DeviceSpec) -> tuple[str, ...]:
        """Backends this device was measured through (by name, model or kind)."""
        return tuple(
            dict.fromkeys(
                dp.backend
                for dp in self.devices
                if dp.device == device.name
                or (device.model and dp.model == device.model)
                or dp.kind == device.kind
            )
        )

    def link(self, a: str, b: str) -> LinkProfile | None:
        for lp in self.links:
            if {lp.a, lp.b} == {a, b}:
                return lp
        return None

    # ---- feedback ------------------------------------------------------------------------------
    def corrections_for(self, device: DeviceSpec, backend: str) -> dict[str, Correction]:
        """key -> correction for `device` through `backend`: by device name, else by model."""
        for match in (
            lambda c: c.device == device.name,
            lambda c: bool(device.model) and c.model == device.model,
        ):
            found = {c.key: c for c in self.corrections if c.backend == backend and match(c)}
            if found:
                return found
        return {}

    def runtime_for(self, executor: str) -> RuntimeProfile | None:
        for r in self.runtime:
            if r.executor == executor:
                return r
        return None

    def without_feedback(self) -> CalibrationProfile:
        """The microbenchmarks' profile alone: what feedback corrections are relative to."""
        if not self.corrections and not self.runtime:
            return self
        return replace(self, corrections=(), runtime=())
