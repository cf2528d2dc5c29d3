"""`calibrate`: measure the devices of a cluster that are present here, through the
backends the plan will run on them, and fit one profile entry per (device, backend)."""

from __future__ import annotations

import platform
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.calibration.compiled import calibrate_compiled
from hetero.calibration.eager import calibrate_eager
from hetero.calibration.fit import Sample
from hetero.calibration.links import calibrate_link
from hetero.calibration.units import Prepared, prepare_units
from hetero.cluster.profile import CalibrationProfile, DeviceProfile
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.partitioner.decisions import BackendAssignment


@dataclass(frozen=True)
class Skipped:
    device: str
    reason: str


def calibrate_device(
    device: DeviceSpec,
    *,
    backend: str = "eager",
    quick: bool = False,
    dtypes: Sequence[str] = ("float32",),
    cache=None,
    workers: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    prepared: Sequence[Prepared] | None = None,
    registry: BackendRegistry | None = None,
) -> tuple[DeviceProfile, list[Sample]]:
    """Measure `device` through `backend` and fit its factors, per op class and dtype (the
    first dtype's also as the plain class: the fallback for others). A compiling backend's
    microbenchmarks (`prepared`, else `prepare_units(quick, dtypes[0])`: it measures the
    first dtype only) go through `cache` (an ArtifactCache; None: the default one), compiled
    in `workers` processes (None: one per core; 1: in this process), the backend looked
    up in `registry` (default: the built-ins and entry points)."""
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    if backend == "eager":
        return calibrate_eager(device, quick=quick, dtypes=tuple(dtypes), log=log)
    return calibrate_compiled(
        device,
        backend,
        quick=quick,
        dtype=dtypes[0],
        cache=cache,
        workers=workers,
        log=log,
        prepared=prepared,
        registry=registry if registry is not None else default_registry(),
    )


def present(
    cluster: ClusterSpec, *, emulated: bool = False
) -> tuple[list[DeviceSpec], list[Skipped]]:
    """Devices of `cluster` that this machine can measure: its CPU (the first host's) and
    the CUDA GPUs torch sees; with `emulated`, also the emulated devices (NPUs whose
    partitions compile for this host and run here: measuring them prices the emulation).
    Other hosts' devices are skipped."""
    hosts = cluster.hosts
    here = hosts[0] if hosts else ""
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    ok, skipped = [], []
    for d in cluster.devices:
        if d.host != here:
            skipped.append(Skipped(d.name, f"on host {d.host}, not this machine"))
        elif d.emulated and not emulated:
            skipped.append(Skipped(d.name, "emulated (no such device here); keeps default factors"))
        elif d.emulated:
            ok.append(d)
        elif d.kind == "gpu" and d.index >= gpus:
            skipped.append(Skipped(d.name, f"no cuda:{d.index} here (torch sees {gpus} GPU(s))"))
        elif d.kind in ("cpu", "gpu"):
            ok.append(d)
        else:
            skipped.append(Skipped(d.name, f"cannot measure {d.kind} devices"))
    return ok, skipped


def backends_to_measure(
    device: DeviceSpec, backends: Sequence[BackendAssignment]
) -> tuple[str, ...]:
    """Backend names to calibrate `device` through: the one each assignment gives its kind
    (each once); eager when there is none."""
    if not backends:
        return ("eager",)
    return tuple(dict.fromkeys(a.for_device(device) for a in backends))


def calibrate(
    cluster: ClusterSpec,
    *,
    backends: BackendAssignment | Sequence[BackendAssignment] = (),
    quick: bool = False,
    emulated: bool = False,
    dtypes: Sequence[str] = ("float32",),
    cache=None,
    workers: int | None = None,
    log: Callable[[str], None] = lambda s: None,
    registry: BackendRegistry | None = None,
) -> tuple[CalibrationProfile, list[Skipped], dict[tuple[str, str], list[Sample]]]:
    """Measure every device present through the backend each of `backends` (one assignment
    or several) gives its kind (see `backends_to_measure`); one profile entry per (device, backend), its factors per op
    class and each of `dtypes` (measure the dtypes the models run in: a CPU's float16
    matmul can be ten times slower than its float32 one). Samples are keyed the same way.
    `cache`/`workers`: where and how compiling backends build their microbenchmarks (see
    `calibrate_device`). registry: where backend names are looked up (default: the
    built-ins and entry points)."""
    registry = registry if registry is not None else default_registry()
    if isinstance(backends, BackendAssignment):
        backends = (backends,)
    devices, skipped = present(cluster, emulated=emulated)
    profiles, samples = [], {}
    prepared = None
    for d in devices:
        for name in backends_to_measure(d, backends):
            if name != "eager" and prepared is None:
                prepared = prepare_units(quick=quick, dtype=dtypes[0])
            prof, s = calibrate_device(
                d,
                backend=name,
                quick=quick,
                dtypes=dtypes,
                cache=cache,
                workers=workers,
                log=log,
                prepared=prepared,
                registry=registry,
            )
            profiles.append(prof)
            samples[d.name, name] = s
    links = []
    for d in devices:
        host = cluster.host_cpu(d.host)
        if d.kind == "gpu" and host is not None:
            links.append(calibrate_link(d, host))
    profile = CalibrationProfile(
        cluster=cluster.name,
        devices=tuple(profiles),
        links=tuple(links),
        host=platform.node(),
        torch_version=torch.__version__,
    )
    return profile, skipped, samples
