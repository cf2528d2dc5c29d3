"""Measuring a device through a compiling backend (tvm, triton, inductor, ...): the
microbenchmarks of `units.py`, compiled THROUGH the backend (artifact cache: re-calibrating
is quick), loaded and their runners timed. A one-element `x + 1` unit gives the fixed cost
of calling a compiled partition, subtracted from the others. Each sample's FLOPs and bytes
are the cost model's own terms for the unit as one fused group (`cost.fused_terms`), so the
fit is in the form `group_time` predicts with. Two whole transformer blocks, each compiled
as one unit, then check the fitted classes on a partition: measured / predicted-as-the-sum-
of-its-groups is the entry's `sequence_factor`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import numpy as np
import torch

from hetero.backends.base import Backend, CompileOptions
from hetero.backends.cache import ArtifactCache
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.registry import BackendRegistry
from hetero.calibration.fit import (
    _KERNEL_OVERHEAD_GRID,
    _WIDE_GRID,
    BLOCK,
    CALL,
    Sample,
    fit_classes,
)
from hetero.calibration.timing import time_call
from hetero.calibration.units import Prepared, prepare_units
from hetero.cluster.profile import CalibrationProfile, DeviceProfile
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.cost import CostModel


def versions_string(backend: Backend) -> str:
    """What a profile entry records of the backend it measured ("apache-tvm=0.27.0 ..."):
    a backend whose versions differ since (a changed lowering) makes the entry stale."""
    return " ".join(f"{k}={v}" for k, v in sorted(backend.versions().items()))


def calibrate_compiled(
    device: DeviceSpec,
    backend_name: str,
    *,
    quick: bool,
    dtype: str,
    cache,
    workers: int | None,
    log: Callable[[str], None],
    prepared: Sequence[Prepared] | None,
    registry: BackendRegistry,
) -> tuple[DeviceProfile, list[Sample]]:
    """Compile the microbenchmarks through `backend_name` (cached), load them as a worker
    would, time them and fit; two whole blocks give the entry's sequence factor."""
    backend = registry.get(backend_name)
    ok = backend.available()
    if not ok:
        raise ConfigError(
            f"cannot calibrate {device.name} through {backend_name}: {ok.reason}. "
            "Install it, or calibrate another backend (--backend eager)."
        )
    cache = cache if cache is not None else ArtifactCache()
    if prepared is None:
        prepared = prepare_units(quick=quick, dtype=dtype)
    todo = []  # (unit, terms, compile unit, env) of those the backend runs on this device
    for p in prepared:
        ops = p.ops
        bad = [
            op.target for op in ops if op.op_class != "view" and not backend.supports(op, device)
        ]
        if bad:
            why = ", ".join(bad)
            log(f"{device.name} ({backend_name}): {p.unit.label}: skipped ({why} unsupported)")
        else:
            todo.append((p.unit, p.terms, p.compile_unit, p.env, p.groups))
    log(f"{device.name} ({backend_name}): compiling {len(todo)} microbenchmarks")
    arts = compile_units(
        [CompileJob(cu, device, backend_name, CompileOptions()) for _, _, cu, _, _ in todo],
        cache,
        workers=workers,
        progress=False,
        registry=registry,
    )

    def sync() -> None:
        if device.kind == "gpu":
            torch.cuda.synchronize(device.index)

    threads = torch.get_num_threads()
    times = []
    try:
        with torch.no_grad():
            for (u, _, cu, env, _), art in zip(todo, arts, strict=True):
                run = backend.load(art, device)  # sizes the thread pools as a worker would
                args = [env[a] for a in cu.inputs]
                if device.kind == "gpu":
                    args = [a.to(f"cuda:{device.index}") for a in args]
                # the block decides a factor for every group: more rounds for a quiet one
                budget = 1.0 if u.op_class == BLOCK else 0.3
                times.append(time_call(lambda run=run, args=args: run(*args), sync, budget=budget))
                log(f"{device.name} ({backend_name}): {u.label}: {times[-1] * 1e6:.1f} us")
        used = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    call_overhead = times[0] if todo and todo[0][0].op_class == CALL else 0.0
    samples = []
    for (u, terms, _, _, _), t in zip(todo, times, strict=True):
        if u.op_class in (CALL, BLOCK):
            continue
        flops = sum(f for cls, _, f in terms.flops if cls == u.op_class)
        nbytes = terms.act_bytes + terms.param_bytes
        # the kernel's own time: what the call costs beyond calling a compiled partition
        samples.append(Sample(u.op_class, u.label, flops, nbytes, max(t - call_overhead, 1e-8)))
    peak, bw = device.peak(dtype), device.mem_bandwidth or 1e10
    effs = fit_classes(samples, peak, bw, 0.0, dtype, _KERNEL_OVERHEAD_GRID, _WIDE_GRID)
    by_key = {e.key: e for e in effs}
    kernel = by_key.get("elementwise")
    profile = DeviceProfile(
        device=device.name,
        kind=device.kind,
        model=device.model,
        peak_flops=peak,
        mem_bandwidth=bw,
        launch_overhead=kernel.overhead if kernel is not None else None,
        view_overhead=0.0,  # views compile to nothing (or fuse into their consumers)
        call_overhead=call_overhead,
        efficiency=effs,
        backend=backend_name,
        threads=used if device.kind != "gpu" else 0,
        backend_versions=versions_string(backend),
    )
    ratios = []
    fusing = frozenset({backend_name}) if backend.fuses else frozenset()
    cm = CostModel(CalibrationProfile("", (profile,)), fusing_backends=fusing)
    for (u, _, _, _, groups), t in zip(todo, times, strict=True):
        if u.op_class == BLOCK:
            og = groups.opgraph
            pred = sum(
                cm.group_time(g, [og[n] for n in g.nodes], device, backend=backend_name)
                for g in groups
            )
            ratios.append((t - call_overhead) / max(pred, 1e-9))
            samples.append(Sample(BLOCK, u.label, 0.0, 0.0, max(t - call_overhead, 1e-8)))
            log(f"{device.name} ({backend_name}): {u.label}: x{ratios[-1]:.2f} of its groups")
    if ratios:
        factor = float(np.clip(np.exp(np.mean(np.log(np.maximum(ratios, 1e-3)))), 0.5, 2.0))
        profile = replace(profile, sequence_factor=factor)
    return profile, samples
