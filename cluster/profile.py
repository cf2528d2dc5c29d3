"""Calibration profiles: what `hetero calibrate` measured on a cluster's devices, as data.

Part of the cluster's description (how fast its devices really are, per backend), so it
lives at the bottom with the spec: frozen values and their JSON, no torch. The cost model
(partitioner/cost.py) reads them; calibration (hetero.calibration) writes them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hetero.cluster.devices import DeviceSpec
from hetero.errors import ConfigError
from hetero.paths import profile_path

PROFILE_SCHEMA_VERSION = 2
# Schema 1 had no backend field: its entries measured torch eager ops, and read as such.
_READABLE_SCHEMAS = (1, 2)


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


@dataclass(frozen=True)
class CalibrationProfile:
    """Measured efficiency factors for the devices of one cluster (JSON on disk)."""

    cluster: str
    devices: tuple[DeviceProfile, ...] = ()
    links: tuple[LinkProfile, ...] = ()
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
            links = tuple(LinkProfile(**lp) for lp in d.get("links", ()))
            rest = {k: v for k, v in d.items() if k not in ("devices", "links")}
            rest["schema_version"] = PROFILE_SCHEMA_VERSION  # read as (upgraded to) the current
            return cls(devices=devices, links=links, **rest)
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
