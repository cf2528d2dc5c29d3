"""Measure the devices that are really here and fit the cost model's efficiency factors.

A profile entry is keyed by (device, backend): what is measured is what that backend makes
of the ops, since the planner prices each device through the backend it runs there.

* eager: microbenchmarks per op class (matmuls of several shapes, elementwise, reductions,
  normalisation, attention, embedding lookups) timed as torch ops; the per-op overhead is
  an op on a one-element tensor, a view op's the same way, a partition call's that of a
  one-op fx module.
* a compiling backend (tvm, ...): the same classes as small modules shaped like the groups
  the planner places (a Linear, a standalone GELU, a LayerNorm, an attention core with its
  head split and merge, an embedding lookup), each captured, compiled THROUGH the backend
  (artifact cache: re-calibrating is quick), loaded and its runner timed. A one-element
  `x + 1` unit gives the fixed cost of calling a compiled partition, subtracted from the
  others. Each sample's FLOPs and bytes are the cost model's own terms for the unit as one
  fused group (`cost.fused_terms`), so the fit is in the form `group_time` predicts with.
  Two whole transformer blocks, each compiled as one unit, then check the fitted classes
  on a partition: measured / predicted-as-the-sum-of-its-groups is the entry's
  `sequence_factor` (kernels run back to back hand the cores between thread pools, e.g.
  TVM's and the BLAS library's, and share caches: no one-kernel unit sees that).

Then, per class, a grid search finds (e_compute, e_memory, overhead) minimising the mean
relative error of max(F / (peak e_c), B / (bw e_m)) + overhead against the measurements;
host<->device copies give link bandwidth and latency where CUDA is present.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency, LinkProfile
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.cost import CostModel, fused_terms
from hetero.partitioner.decisions import BackendAssignment

_GRID = np.geomspace(0.002, 1.5, 64)


@dataclass(frozen=True)
class Sample:
    op_class: str
    label: str
    flops: float
    nbytes: float
    seconds: float
    dtype: str = ""  # what it ran in ("": the profile's first dtype)
    peak: float = 0.0  # the FLOP/s peak of that dtype its factors are relative to (0: entry's)


@dataclass(frozen=True)
class Skipped:
    device: str
    reason: str


def time_call(
    fn: Callable[[], object], sync: Callable[[], None] = lambda: None, budget: float = 0.15
) -> float:
    """Seconds per call: warm up, then short rounds (about 1 ms each) within `budget`
    seconds, keeping the fastest. On a shared machine the slower rounds measure other
    processes, not the op, and a short round is likelier to run undisturbed."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(1, min(1000, int(1e-3 / once)))
    reps = max(5, min(300, int(budget / (once * inner))))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


CHAIN_SHORT, CHAIN_LONG = 4, 68


def _chain(torch, ops: int, views: bool):
    """`ops` dependent ops on one tensor (adds, or views that the export keeps as
    aten.view): run as the eager backend runs a partition, their cost per op is the
    backend's dispatch, and a short chain's remainder is the cost of calling a partition."""

    class Chain(torch.nn.Module):
        def forward(self, x):
            for i in range(ops):
                x = x.view(1, 1) if views and i % 2 == 0 else x.view(1) if views else x + 1
            return (x,)

    return Chain()


def runner_dispatch(torch, dev, dtype, sync) -> tuple[float, float, float]:
    """(seconds per op, per view op, per partition call) as the eager backend runs a
    partition: a torch.export program's module (what `EagerBackend.load` calls), timed at
    two chain lengths. Dispatching through it costs more than a bare torch call (each op
    is an OpOverload call from the program's Python code), and on a GPU it is what small
    partitions are bound by."""
    x = torch.ones(1, device=dev, dtype=dtype)
    timed = {}
    for views in (False, True):
        for n in (CHAIN_SHORT, CHAIN_LONG):
            ep = torch.export.export(_chain(torch, n, views).eval(), (x,), strict=False)
            mod = ep.module().to(dev)
            timed[views, n] = time_call(lambda mod=mod: mod(x), sync)
    span = CHAIN_LONG - CHAIN_SHORT
    per_op = max((timed[False, CHAIN_LONG] - timed[False, CHAIN_SHORT]) / span, 1e-8)
    per_view = max((timed[True, CHAIN_LONG] - timed[True, CHAIN_SHORT]) / span, 0.0)
    call = max(timed[False, CHAIN_SHORT] - CHAIN_SHORT * per_op, 0.0)
    return per_op, per_view, call


def _cases(torch, dev, dtype, quick: bool) -> Iterator[tuple[str, str, Callable, float, float]]:
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


_OVERHEAD_GRID = np.array([0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# Compiled kernels span a wider range than eager ops: a scalar transcendental loop reaches
# a ten-thousandth of a datasheet peak (an emulated NPU's peak is a TFLOPS), and a small
# tensor that stays in cache moves faster than the DRAM bandwidth the factors are relative to.
_WIDE_GRID = np.geomspace(1e-5, 8.0, 112)
# A compiled kernel's overhead ranges from a TIR loop's entry (~0.1 us) to a call back into
# a library through the FFI (tens of us): searched over this whole range.
_KERNEL_OVERHEAD_GRID = np.concatenate([[0.0], np.geomspace(1e-7, 2e-3, 56)])


def fit(
    samples: list[Sample],
    peak: float,
    bandwidth: float,
    overhead: float,
    overheads: np.ndarray | None = None,
    grid: np.ndarray | None = None,
) -> tuple[float, float, float, float]:
    """(e_compute, e_memory, per-op overhead, mean |relative error|) for one op class.

    The overhead is searched around the measured one-element op (a class's own dispatch,
    argument parsing, output allocation, differs from an add's), or over `overheads`; the
    efficiencies over `grid` (default: 0.002 to 1.5)."""
    grid = _GRID if grid is None else grid
    f = np.array([s.flops for s in samples])
    b = np.array([s.nbytes for s in samples])
    t = np.array([s.seconds for s in samples])
    tc = f[None, :] / (peak * grid[:, None])  # [G, S]
    tm = b[None, :] / (bandwidth * grid[:, None])
    roof = np.maximum(tc[:, None, :], tm[None, :, :])  # [Gc, Gm, S]
    best = (np.inf, 0, 0, overhead)
    for ov in overhead * _OVERHEAD_GRID if overheads is None else overheads:
        err = (np.abs(roof + ov - t) / t).mean(axis=2)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), i, j, float(ov))
    err, i, j, ov = best
    return float(grid[i]), float(grid[j]), ov, err


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
) -> tuple[DeviceProfile, list[Sample]]:
    """Measure `device` through `backend` and fit its factors, per op class and dtype (the
    first dtype's also as the plain class: the fallback for others). A compiling backend's
    microbenchmarks (`prepared`, else `prepare_units(quick, dtypes[0])`: it measures the
    first dtype only) go through `cache` (an ArtifactCache; None: the default one), compiled
    in `workers` processes (None: one per core; 1: in this process)."""
    if isinstance(dtypes, str):
        dtypes = (dtypes,)
    if backend == "eager":
        return _calibrate_eager(device, quick=quick, dtypes=tuple(dtypes), log=log)
    return _calibrate_compiled(
        device,
        backend,
        quick=quick,
        dtype=dtypes[0],
        cache=cache,
        workers=workers,
        log=log,
        prepared=prepared,
    )


def _threads(device: DeviceSpec, available: int) -> int:
    """Threads a CPU device's ops run with: its cores (as backends size their pools)."""
    if device.kind in ("cpu", "npu") and device.cores:
        return max(1, min(device.cores, available))
    return available


def _calibrate_eager(
    device: DeviceSpec, *, quick: bool, dtypes: Sequence[str], log: Callable[[str], None]
) -> tuple[DeviceProfile, list[Sample]]:
    import torch

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
    used = _threads(device, threads)
    torch.set_num_threads(used)
    samples: list[Sample] = []
    effs: list[Efficiency] = []
    try:
        with torch.no_grad():
            one = torch.ones(1, device=dev, dtype=torch.float32)
            bare = time_call(lambda: one + one, sync)
            per_op, per_view, call = runner_dispatch(torch, dev, torch.float32, sync)
            log(
                f"{device.name} (eager): dispatch {per_op * 1e6:.1f} us/op through the runner "
                f"({bare * 1e6:.1f} us as a bare torch call), {per_view * 1e6:.1f} us/view, "
                f"{call * 1e6:.1f} us/partition call"
            )
            for dtype in dtypes:
                tdtype = getattr(torch, dtype)
                mine = []
                for cls, label, fn, flops, nbytes in _cases(torch, dev, tdtype, quick):
                    t = time_call(fn, sync)
                    peak = device.peak(dtype)
                    mine.append(Sample(cls, label, float(flops), float(nbytes), t, dtype, peak))
                    log(f"{device.name} (eager, {dtype}): {label}: {mine[-1].seconds * 1e6:.1f} us")
                # The cases are bare torch calls; a partition's ops pay the runner's extra
                # dispatch on top of each class's fitted overhead.
                fitted = _fit_classes(mine, device.peak(dtype), bw, bare, dtype)
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
            factor, block_samples = _eager_blocks(
                torch, device, dev, dtypes[0], quick, sync, profile
            )
    finally:
        torch.set_num_threads(threads)
    for s in block_samples:
        log(f"{device.name} (eager): {s.label}: {s.seconds * 1e6:.1f} us")
    log(f"{device.name} (eager): whole blocks x{factor:.2f} of their ops' dispatch")
    return replace(profile, sequence_factor=factor), samples + block_samples


def _eager_blocks(
    torch, device: DeviceSpec, dev, dtype: str, quick: bool, sync, profile: DeviceProfile
) -> tuple[float, list[Sample]]:
    """Whole transformer blocks run through the eager runner (a torch.export program's
    module), against the sum of their groups' predictions: the microbenchmarks repeat one
    op on warm caches, a partition dispatches ~80 different ones (dtype casts, views,
    small norms), which on a GPU made a decoder layer's dispatch 2-3x the per-op sum. The
    factor scales eager dispatch (the host side, `CostModel.queued_time`) on a GPU and the
    whole group on a CPU, as `sequence_factor` does for compiling backends."""
    from hetero.partitioner.graph import capture

    tdtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        blocks = [u for u in _units(torch, quick, tdtype) if u.op_class == BLOCK]
    cm = CostModel(CalibrationProfile("", (profile,)))
    ratios, samples = [], []
    for u in blocks:
        u = replace(u, module=u.module.to(tdtype))  # _units leaves parameters in float32
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


def _fit_classes(
    samples: list[Sample],
    peak: float,
    bw: float,
    overhead: float,
    dtype: str,
    overheads: np.ndarray | None = None,
    grid: np.ndarray | None = None,
) -> tuple[Efficiency, ...]:
    effs = []
    for cls in dict.fromkeys(s.op_class for s in samples):
        mine = [s for s in samples if s.op_class == cls]
        ec, em, ov, err = fit(mine, peak, bw, overhead, overheads, grid)
        effs.append(Efficiency(f"{cls}/{dtype}", ec, em, err, len(mine), ov))
        effs.append(Efficiency(cls, ec, em, err, len(mine), ov))
    return tuple(effs)


# ---- compiling backends ---------------------------------------------------------------------


@dataclass(frozen=True)
class Unit:
    """One compiled microbenchmark: a module shaped like a group the planner places."""

    op_class: str  # the class it measures (its one kernel of that class)
    label: str
    module: object  # torch.nn.Module
    inputs: tuple  # example inputs


def _units(torch, quick: bool, dtype) -> list[Unit]:
    """Microbenchmarks for a compiling backend. Shapes: small transformers on a CPU (the
    demo's tiny_gpt: 64 tokens x 128 wide, 4 heads) up to a few ms per call, so that a quiet
    round exists on a shared machine; `quick` keeps a few per class (for tests)."""
    nn, F = torch.nn, torch.nn.functional

    class Linear(nn.Module):
        def __init__(self, k, n, bias=True):
            super().__init__()
            self.fc = nn.Linear(k, n, bias=bias)

        def forward(self, x):
            return self.fc(x)

    class Gelu(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    class Add(nn.Module):
        def forward(self, x, y):
            return x + y

    class Norm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.ln = nn.LayerNorm(c)

        def forward(self, x):
            return self.ln(x)

    class Softmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1)

    class Attention(nn.Module):
        """Causal SDPA between a qkv projection and the output projection: heads split
        from one [B, T, 3C] tensor and merged back, an attention group as the planner
        sees one (views and SDPA, nothing an NPU rejects)."""

        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, qkv):
            b, t, c3 = qkv.shape
            c = c3 // 3
            q, k, v = qkv.split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(b, t, c)

    class Block(nn.Module):
        """A pre-LN transformer block: the whole-partition check (see `BLOCK`)."""

        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class Lookup(nn.Module):
        def __init__(self, rows, dim):
            super().__init__()
            self.table = nn.Embedding(rows, dim)

        def forward(self, idx):
            return self.table(idx)

    def r(*shape):
        return torch.randn(*shape, dtype=dtype)

    units: list[Unit] = []
    # (tokens, in, out, bias): the demo's qkv/proj/fc/proj/head, then larger
    mm = [(64, 128, 384, True), (64, 128, 128, True), (64, 128, 512, True), (64, 512, 128, True)]
    mm += [(64, 128, 512, False)] if not quick else []
    mm += [(256, 256, 1024, True), (128, 768, 768, True), (512, 512, 512, True)]
    if quick:
        mm = mm[:2] + mm[-1:]
    for t, k, n, bias in mm:
        units.append(
            Unit("matmul", f"linear {t}x{k}->{n}", Linear(k, n, bias).eval(), (r(1, t, k),))
        )
    for t, c in [(64, 512), (256, 1024), (512, 3072)][: 2 if quick else 3]:
        units.append(Unit("transcendental", f"gelu(tanh) {t}x{c}", Gelu(), (r(1, t, c),)))
    for t, c in [(64, 128), (256, 1024), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("elementwise", f"add {t}x{c}", Add(), (r(1, t, c), r(1, t, c))))
    for t, c in [(64, 128), (256, 768), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("norm", f"layer_norm {t}x{c}", Norm(c).eval(), (r(1, t, c),)))
    for t, c in [(64, 256), (512, 768), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("reduction", f"softmax {t}x{c}", Softmax(), (r(1, t, c),)))
    att = [(1, 4, 64, 32), (1, 8, 128, 64), (2, 12, 128, 64)]
    for b, h, t, d in att[: 2 if quick else 3]:
        units.append(
            Unit("attention", f"sdpa {b}x{h}x{t}x{d}", Attention(h), (r(b, t, 3 * h * d),))
        )
    for rows, dim, n in [(512, 128, 64), (128, 128, 64), (4096, 256, 512)][: 2 if quick else 3]:
        idx = torch.randint(0, rows, (1, n))
        units.append(Unit("data", f"embedding {n} of {rows}x{dim}", Lookup(rows, dim), (idx,)))
    for t, c in [(64, 128), (128, 256)]:
        units.append(
            Unit(BLOCK, f"transformer block {t}x{c}, 4 heads", Block(c, 4).eval(), (r(1, t, c),))
        )
    return units


def _trivial(torch):
    class PlusOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    return PlusOne()


CALL = "call"  # the op class of the unit that measures calling a compiled partition
# The op class of the units that check the fitted classes on a whole partition: pre-LN
# transformer blocks (two widths) compiled as one unit each, priced as the sum of their
# coarse groups. The geometric mean of measured / predicted becomes the entry's
# `sequence_factor`: what running kernels back to
# back costs beyond each alone (thread pools handing the cores to each other, e.g. TVM's to
# the BLAS library's, caches), which no microbenchmark of one kernel sees.
BLOCK = "block"


@dataclass(frozen=True)
class Prepared:
    """A microbenchmark captured and cut into its CompileUnit: the same for every device."""

    unit: Unit
    ops: tuple  # its OpNodes
    terms: object  # cost.FusedTerms: what the cost model prices it by
    groups: object  # its coarse groups (partitioner.coarsen.GroupGraph)
    compile_unit: object  # backends.base.CompileUnit
    env: dict  # example values by name


def prepare_units(*, quick: bool = False, dtype: str = "float32") -> list[Prepared]:
    """Capture the compiled-backend microbenchmarks once (torch.export takes ~1 s each), the
    partition-call unit first; `calibrate` shares them across devices and backends."""
    import torch

    from hetero.backends.units import units_for
    from hetero.partitioner.graph import capture

    tdtype = getattr(torch, dtype)
    call = Unit(CALL, "x + 1 (one element)", _trivial(torch), (torch.ones(1, dtype=tdtype),))
    out = []
    # Fixed weights: the artifact key hashes them, and equal keys let re-calibration reuse
    # the cache. fork_rng leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        units = [call, *_units(torch, quick, tdtype)]
    for u in units:
        graph = capture(u.module, u.inputs)
        ops = tuple(graph[n] for n in graph.order)
        groups = graph.coarsen(depth=0)  # the whole module: one group, priced as one
        terms = fused_terms(groups.groups[0], ops)
        _, cunits, env = units_for(graph, dict.fromkeys(graph.order, 0), *u.inputs)
        # named for error messages (the name is not part of the artifact key)
        unit = replace(cunits[0], name=f"calibration {u.label}")
        out.append(Prepared(u, ops, terms, graph.coarsen(), unit, env))
    return out


def _calibrate_compiled(
    device: DeviceSpec,
    backend_name: str,
    *,
    quick: bool,
    dtype: str,
    cache,
    workers: int | None,
    log: Callable[[str], None],
    prepared: Sequence[Prepared] | None,
) -> tuple[DeviceProfile, list[Sample]]:
    import torch

    from hetero.backends.base import CompileOptions
    from hetero.backends.cache import ArtifactCache
    from hetero.backends.compile import CompileJob, compile_units
    from hetero.backends.registry import default_registry

    backend = default_registry().get(backend_name)
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
    effs = _fit_classes(samples, peak, bw, 0.0, dtype, _KERNEL_OVERHEAD_GRID, _WIDE_GRID)
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


def calibrate_link(gpu: DeviceSpec, host: DeviceSpec) -> LinkProfile:
    """Pinned host->device copies of two sizes give latency and bandwidth."""
    import torch

    dev = torch.device("cuda", gpu.index)
    sizes = [1 << 16, 1 << 26]
    times = []
    for n in sizes:
        src = torch.empty(n, dtype=torch.uint8).pin_memory()
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        times.append(
            time_call(
                lambda s=src, d=dst: d.copy_(s, non_blocking=True),
                lambda: torch.cuda.synchronize(dev),
            )
        )
    bw = (sizes[1] - sizes[0]) / max(times[1] - times[0], 1e-9)
    latency = max(times[0] - sizes[0] / bw, 0.0)
    return LinkProfile(host.name, gpu.name, bw, latency)


def present(
    cluster: ClusterSpec, *, emulated: bool = False
) -> tuple[list[DeviceSpec], list[Skipped]]:
    """Devices of `cluster` that this machine can measure: its CPU (the first host's) and
    the CUDA GPUs torch sees; with `emulated`, also the emulated devices (NPUs whose
    partitions compile for this host and run here: measuring them prices the emulation).
    Other hosts' devices are skipped."""
    import torch

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


def versions_string(backend) -> str:
    """What a profile entry records of the backend it measured ("apache-tvm=0.27.0 ..."):
    a backend whose versions differ since (a changed lowering) makes the entry stale."""
    return " ".join(f"{k}={v}" for k, v in sorted(backend.versions().items()))


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
) -> tuple[CalibrationProfile, list[Skipped], dict[tuple[str, str], list[Sample]]]:
    """Measure every device present through the backend each of `backends` (one assignment
    or several) gives its kind (see `backends_to_measure`); one profile entry per (device, backend), its factors per op
    class and each of `dtypes` (measure the dtypes the models run in: a CPU's float16
    matmul can be ten times slower than its float32 one). Samples are keyed the same way.
    `cache`/`workers`: where and how compiling backends build their microbenchmarks (see
    `calibrate_device`)."""
    import torch

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


def sample_prediction(entry: DeviceProfile, sample: Sample) -> float:
    """Seconds the fitted factors of `entry` predict for one of its samples."""
    if sample.op_class == BLOCK:
        return sample.seconds  # checked as a whole: see `sequence_factor`
    by_key = {e.key: e for e in entry.efficiency}
    e = by_key.get(f"{sample.op_class}/{sample.dtype}") or by_key[sample.op_class]
    peak = sample.peak or entry.peak_flops
    t_c = sample.flops / (peak * e.compute) if sample.flops else 0.0
    t_m = sample.nbytes / (entry.mem_bandwidth * e.memory) if sample.nbytes else 0.0
    return max(t_c, t_m) + (e.overhead or 0.0)


def fit_errors(
    profile: CalibrationProfile,
) -> list[tuple[str, str, str, float, float, float, float, int]]:
    """(device, backend, "op class/dtype", e_compute, e_memory, overhead s, error, samples)
    per class and dtype measured."""
    rows = []
    for dp in profile.devices:
        for e in dp.efficiency:
            if "/" in e.key:
                rows.append(
                    (
                        dp.device,
                        dp.backend,
                        e.key,
                        e.compute,
                        e.memory,
                        e.overhead or 0.0,
                        e.error,
                        e.samples,
                    )
                )
    return rows
