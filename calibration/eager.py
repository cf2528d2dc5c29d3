"""Measuring a device through the eager backend: microbenchmarks per op class timed as
torch ops (matmuls of several shapes, elementwise, reductions, normalisation, attention,
embedding lookups); the per-op overhead is an op on a one-element tensor, a view op's the
same way, a partition call's that of a one-op fx module; whole transformer blocks give the
sequence factor."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace

import numpy as np
import torch

from hetero.backends.export import runnable
from hetero.calibration.fit import BLOCK, Sample, fit_classes
from hetero.calibration.timing import Progress, time_call
from hetero.calibration.units import unit_modules
from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency
from hetero.cluster.spec import DeviceSpec
from hetero.partitioner.cost import CostModel
from hetero.partitioner.graph import capture


def threads_for(device: DeviceSpec, available: int) -> int:
    """Threads a CPU device's ops run with: its cores (as backends size their pools)."""
    if device.kind in ("cpu", "npu") and device.cores:
        return max(1, min(device.cores, available))
    return available


CHAIN_SHORT, CHAIN_LONG = 4, 68


def _chain(ops: int, views: bool) -> torch.nn.Module:
    """`ops` dependent ops on one tensor (adds, or views that the export keeps as
    aten.view): run as the eager backend runs a partition, their cost per op is the
    backend's dispatch, and a short chain's remainder is the cost of calling a partition."""

    class Chain(torch.nn.Module):
        def forward(self, x):
            for i in range(ops):
                x = x.view(1, 1) if views and i % 2 == 0 else x.view(1) if views else x + 1
            return (x,)

    return Chain()


def runner_dispatch(dev, dtype, sync) -> tuple[float, float, float]:
    """(seconds per op, per view op, per partition call) as the eager backend runs a
    partition: a torch.export program's module (what `EagerBackend.load` calls), timed at
    two chain lengths. Dispatching through it costs more than a bare torch call (each op
    is an OpOverload call from the program's Python code), and on a GPU it is what small
    partitions are bound by."""
    x = torch.ones(1, device=dev, dtype=dtype)
    timed = {}
    for views in (False, True):
        for n in (CHAIN_SHORT, CHAIN_LONG):
            ep = torch.export.export(_chain(n, views).eval(), (x,), strict=False)
            mod = runnable(ep).to(dev)
            timed[views, n] = time_call(lambda mod=mod: mod(x), sync)
    span = CHAIN_LONG - CHAIN_SHORT
    per_op = max((timed[False, CHAIN_LONG] - timed[False, CHAIN_SHORT]) / span, 1e-8)
    per_view = max((timed[True, CHAIN_LONG] - timed[True, CHAIN_SHORT]) / span, 0.0)
    call = max(timed[False, CHAIN_SHORT] - CHAIN_SHORT * per_op, 0.0)
    return per_op, per_view, call


def cases(dev, dtype, quick: bool) -> Iterator[tuple[str, str, Callable, float, float]]:
    """(op class, label, callable, FLOPs, bytes) microbenchmarks."""
    size = torch.finfo(dtype).bits // 8
    # Shapes around those of small transformers; on a CPU each call stays within a few ms so
    # that a quiet round exists on a shared machine. GPUs get large ones too.
    mm = [(64, 64, 64), (128, 128, 384), (128, 512, 128), (256, 256, 256), (1, 2048, 2048)]
    if dev.type != "cpu":
        mm += [(1024, 1024, 1024), (4096, 4096, 4096), (8, 4096, 1024)]
    elif not quick:
        mm += [(512, 512, 512)]
    for m, k, n in mm:
        a = torch.randn(m, k, device=dev, dtype=dtype)
        b = torch.randn(k, n, device=dev, dtype=dtype)
        yield (
            "matmul",
            f"mm {m}x{k}x{n}",
            lambda a=a, b=b: a @ b,
            2 * m * k * n,
            (m * k + k * n + m * n) * size,
        )
    elems = [1 << 12, 1 << 16, 1 << 20] + ([] if quick else [1 << 22])
    if dev.type != "cpu":  # below ~16 MB a GPU op is dispatch-bound: no bandwidth to fit
        elems += [1 << 24, 1 << 26]
    for e in elems:
        x = torch.randn(e, device=dev, dtype=dtype)
        y = torch.randn(e, device=dev, dtype=dtype)
        yield "elementwise", f"add {e}", lambda x=x, y=y: x + y, e, 3 * e * size
        yield "elementwise", f"mul {e}", lambda x=x, y=y: x * y, e, 3 * e * size
        yield (
            "transcendental",
            f"gelu(tanh) {e}",
            lambda x=x: torch.nn.functional.gelu(x, approximate="tanh"),
            e,
            2 * e * size,
        )
        yield (
            "transcendental",
            f"silu {e}",
            lambda x=x: torch.nn.functional.silu(x),
            e,
            2 * e * size,
        )
    rows_cols = [(64, 256), (512, 768), (2048, 1024)]
    if dev.type != "cpu":
        rows_cols += [(8192, 2048), (16384, 4096)]
    for rows, cols in rows_cols:
        x = torch.randn(rows, cols, device=dev, dtype=dtype)
        e = rows * cols
        yield "reduction", f"sum {rows}x{cols}", lambda x=x: x.sum(-1), e, (e + rows) * size
        yield (
            "reduction",
            f"softmax {rows}x{cols}",
            lambda x=x: torch.softmax(x, -1),
            4 * e,
            2 * e * size,
        )
        w = torch.ones(cols, device=dev, dtype=dtype)
        yield (
            "norm",
            f"layer_norm {rows}x{cols}",
            lambda x=x, w=w: torch.nn.functional.layer_norm(x, (x.shape[-1],), w, w),
            5 * e,
            2 * e * size,
        )
    sdpa = [(1, 4, 64, 32), (2, 12, 128, 64)] + ([] if quick else [(1, 12, 512, 64)])
    if dev.type != "cpu":
        sdpa += [(4, 32, 256, 64), (8, 16, 1024, 64)]
    for b, h, t, d in sdpa:
        q = torch.randn(b, h, t, d, device=dev, dtype=dtype)
        yield (
            "attention",
            f"sdpa {b}x{h}x{t}x{d}",
            lambda q=q: torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=True),
            4 * b * h * t * t * d,
            4 * b * h * t * d * size,
        )
    for rows, cols in [(64, 128), (512, 768)]:
        table = torch.randn(4096, cols, device=dev, dtype=dtype)
        idx = torch.randint(0, 4096, (rows,), device=dev)
        yield (
            "data",
            f"embedding {rows}x{cols}",
            lambda t=table, i=idx: t[i],
            0,
            2 * rows * cols * size,
        )


def calibrate_eager(
    device: DeviceSpec,
    *,
    quick: bool,
    dtypes: Sequence[str],
    log: Callable[[str], None],
    progress: Progress = lambda what, done, total: None,
) -> tuple[DeviceProfile, list[Sample]]:
    bw = device.mem_bandwidth or 1e10
    if device.kind == "gpu":
        dev = torch.device("cuda", device.index)

        def sync() -> None:
            torch.cuda.synchronize(dev)
    else:
        dev = torch.device("cpu")

        def sync() -> None:
            return None

    threads = torch.get_num_threads()
    used = threads_for(device, threads)
    torch.set_num_threads(used)
    samples: list[Sample] = []
    effs: list[Efficiency] = []
    try:
        with torch.no_grad():
            one = torch.ones(1, device=dev, dtype=torch.float32)
            bare = time_call(lambda: one + one, sync)
            per_op, per_view, call = runner_dispatch(dev, torch.float32, sync)
            log(
                f"{device.name} (eager): dispatch {per_op * 1e6:.1f} us/op through the runner "
                f"({bare * 1e6:.1f} us as a bare torch call), {per_view * 1e6:.1f} us/view, "
                f"{call * 1e6:.1f} us/partition call"
            )
            what, done = f"calibrating {device.name} (eager)", 0
            for dtype in dtypes:
                tdtype = getattr(torch, dtype)
                mine = []
                # a generator (each case allocates its tensors): the total is not known
                for cls, label, fn, flops, nbytes in cases(dev, tdtype, quick):
                    t = time_call(fn, sync)
                    peak = device.peak(dtype)
                    mine.append(Sample(cls, label, float(flops), float(nbytes), t, dtype, peak))
                    log(f"{device.name} (eager, {dtype}): {label}: {mine[-1].seconds * 1e6:.1f} us")
                    done += 1
                    progress(what, done, 0)
                # The cases are bare torch calls; a partition's ops pay the runner's extra
                # dispatch on top of each class's fitted overhead.
                fitted = fit_classes(mine, device.peak(dtype), bw, bare, dtype)
                # the plain "class" keys (the fallback for dtypes not measured): the first's
                effs += [e for e in fitted if "/" in e.key or dtype == dtypes[0]]
                samples += mine
    finally:
        torch.set_num_threads(threads)
    profile = DeviceProfile(
        device=device.name,
        kind=device.kind,
        model=device.model,
        peak_flops=device.peak(dtypes[0]),
        mem_bandwidth=bw,
        launch_overhead=bare,
        # the cases are bare torch calls; a partition's ops pay the runner's extra dispatch
        runner_overhead=max(per_op - bare, 0.0),
        view_overhead=per_view,
        call_overhead=call,
        efficiency=tuple(effs),
        backend="eager",
        threads=used if device.kind != "gpu" else 0,
    )
    torch.set_num_threads(used)
    try:
        with torch.no_grad():
            factor, block_samples = _eager_blocks(device, dev, dtypes[0], quick, sync, profile)
    finally:
        torch.set_num_threads(threads)
    for s in block_samples:
        log(f"{device.name} (eager): {s.label}: {s.seconds * 1e6:.1f} us")
    log(f"{device.name} (eager): whole blocks x{factor:.2f} of their ops' dispatch")
    return replace(profile, sequence_factor=factor), samples + block_samples


def _eager_blocks(
    device: DeviceSpec, dev, dtype: str, quick: bool, sync, profile: DeviceProfile
) -> tuple[float, list[Sample]]:
    """Whole transformer blocks run through the eager runner (a torch.export program's
    module), against the sum of their groups' predictions: the microbenchmarks repeat one
    op on warm caches, a partition dispatches ~80 different ones (dtype casts, views,
    small norms), which on a GPU made a decoder layer's dispatch 2-3x the per-op sum. The
    factor scales eager dispatch (the host side, `CostModel.queued_time`) on a GPU and the
    whole group on a CPU, as `sequence_factor` does for compiling backends."""
    tdtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blocks = [u for u in unit_modules(quick, tdtype) if u.op_class == BLOCK]
    cm = CostModel(CalibrationProfile("", (profile,)))
    ratios, samples = [], []
    for u in blocks:
        u = replace(u, module=u.module.to(tdtype))  # unit_modules leaves weights in float32
        graph = capture(u.module, u.inputs)
        pred = 0.0
        for g in graph.coarsen():
            ops = [graph[n] for n in g.nodes]
            pred += (
                cm.dispatch_time(ops, device, backend="eager")
                if device.kind == "gpu"  # the factor scales a GPU's dispatch side only
                else cm.group_time(g, ops, device, backend="eager")
            )
        inputs = tuple(a.to(dev) for a in u.inputs)
        mod = torch.export.export(u.module.to(dev).eval(), inputs, strict=False).module()
        t = time_call(lambda mod=mod, inputs=inputs: mod(*inputs), sync, budget=1.0)
        t = max(t - (profile.call_overhead or 0.0), 1e-8)
        ratios.append(t / max(pred, 1e-9))
        samples.append(Sample(BLOCK, u.label, 0.0, 0.0, t, dtype))
    if not ratios:
        return 1.0, samples
    return float(np.clip(np.exp(np.mean(np.log(ratios))), 0.5, 4.0)), samples
