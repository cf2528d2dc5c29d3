"""Measuring what prices the `split` placement: the host CPU's matrix-vector rate and the
host->GPU copy rate *while both run at once*.

A split layer reads part of its weights over the link and the rest with the CPU, and both
draw on the host's memory; each one's rate alone over-promises. So: weights larger than the
last-level cache (a decode step reads each weight once, from DRAM), copies queued on a side
stream from the same thread (no spinning copy thread competing for a core), the CPU
multiplying while the copies run, each rate over the same window.

The copies' source is larger than the last-level cache too. The copy engine's reads of
pinned memory are served from that cache where the lines sit there: one 256 MiB source read
over and over (an H200 host has a 300 MiB L3) hardly touched DRAM, and the CPU measured
65.9 GB/s beside a 55 GB/s link, where inside a decode step, whose streamed weights come
from DRAM, its products ran at 33-35 GB/s beside the same link (run 18's trace): the two
shared the host's ~90 GB/s of DRAM reads.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hetero.backends import cpu_gemv
from hetero.backends.gpu_cpu_mm import gpu_cpu_mm, overlapped
from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency, LinkProfile
from hetero.cluster.spec import ClusterSpec, DeviceSpec

ROWS, COLS = 11008, 4096  # a 7B decoder layer's MLP matrix: 86 MiB in 16 bits
COPY_BYTES = 256 << 20


@dataclass(frozen=True)
class SplitRates:
    """Bytes per second, each alone and each while the other runs."""

    dtype: str
    batch: int
    cpu_alone: float
    cpu_shared: float
    link_alone: float
    link_shared: float
    handoff_s: float = (
        0.0  # one hand-off (activation to the host, a tiny product, back) while the link streams
    )


def _weights(dtype: torch.dtype, total: int) -> list[torch.Tensor]:
    one = ROWS * COLS * torch.tensor([], dtype=dtype).element_size()
    return [torch.randn(ROWS, COLS).to(dtype) for _ in range(max(2, total // one))]


def _torch_mm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return torch.mm(x, w.t())


def _gemv_rate(weights, x, seconds: float, until=None, product=_torch_mm) -> float:
    """Weight bytes per second of `product(x, W)` (x @ W.T) over `weights` in turn, for
    `seconds` or until `until()` is true."""
    nbytes = weights[0].numel() * weights[0].element_size()
    product(x, weights[0])  # warm the thread pool
    n, t0 = 0, time.perf_counter()
    while True:
        product(x, weights[n % len(weights)])
        n += 1
        el = time.perf_counter() - t0
        if (until is not None and until()) or (until is None and el >= seconds):
            return n * nbytes / el


def host_product(weights, x, seconds: float) -> tuple[Callable, float]:
    """The faster of torch's product and hetero's matrix-vector kernel (backends/cpu_gemv.py:
    one of the CPU decode program's candidates, for the 16-bit dtypes) on this host, and its
    rate alone: the CPU's rows are priced with the product their programs can run. A split
    layer's own CPU rows still multiply with torch's product (in a TorchScript task, which
    cannot call the kernel): a feedback round's split-CPU factor measures that gap with the
    rest of a split's (run 44: +60% against calibrated, run 43's torch-priced +35%)."""
    best = (_torch_mm, _gemv_rate(weights, x, seconds))
    if cpu_gemv.takes(x, weights[0], None) and cpu_gemv.available():
        rate = _gemv_rate(weights, x, seconds, product=cpu_gemv.gemv)
        if rate > best[1]:
            best = (cpu_gemv.gemv, rate)
    return best


def copy_sources(total: int) -> list[torch.Tensor]:
    """Pinned copy sources, `total` bytes in all, read in turn (from DRAM, as streamed weights
    are: see the module's note)."""
    return [
        torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
        for _ in range(max(2, -(-total // COPY_BYTES)))
    ]


def queue_copies(dev: torch.device, count: int, sources: list[torch.Tensor]):
    dst = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.stream(stream):
        start.record(stream)
        for k in range(count):
            dst.copy_(sources[k % len(sources)], non_blocking=True)
        end.record(stream)
    return start, end, count * COPY_BYTES


def rates_at_once(
    dev: torch.device,
    weights: list[torch.Tensor],
    x: torch.Tensor,
    sources: list[torch.Tensor],
    seconds: float,
    link_rate: float,
    product: Callable = _torch_mm,
) -> tuple[float, float]:
    """(the CPU's x @ W.T rate over `weights`, the link's copy rate from `sources`) in bytes
    per second, both over the same window of about `seconds` (the copies queued for that
    long at `link_rate`): what the split placement is priced with."""
    count = max(4, int(link_rate * seconds / COPY_BYTES))
    start, end, nbytes = queue_copies(dev, count, sources)
    cpu = _gemv_rate(weights, x, seconds, until=end.query, product=product)
    end.synchronize()
    return cpu, nbytes / (start.elapsed_time(end) / 1e3)


def calibrate_split(
    gpu: DeviceSpec,
    *,
    dtypes: tuple[str, ...] = ("float16", "bfloat16", "float32"),
    batch: int = 1,
    seconds: float = 1.0,
    l3_bytes: int = 512 << 20,
) -> tuple[SplitRates, ...]:
    """The rates on this machine (needs CUDA) for each dtype the CPU's rows may be kept in
    (the planner picks among the measured ones): GPU `gpu`, the CPU threads torch has."""
    return tuple(
        _measure(gpu, dtype, batch=batch, seconds=seconds, l3_bytes=l3_bytes) for dtype in dtypes
    )


def _measure(
    gpu: DeviceSpec, dtype: str, *, batch: int, seconds: float, l3_bytes: int
) -> SplitRates:
    dev = torch.device("cuda", gpu.index)
    t = getattr(torch, dtype)
    weights = _weights(t, 2 * l3_bytes)
    sources = copy_sources(2 * l3_bytes)
    x = torch.randn(batch, COLS).to(t)
    product, cpu_alone = host_product(weights, x, seconds)
    start, end, nbytes = queue_copies(dev, max(8, len(sources)), sources)
    end.synchronize()
    link_alone = nbytes / (start.elapsed_time(end) / 1e3)
    cpu_shared, link_shared = rates_at_once(
        dev, weights, x, sources, seconds, link_alone, product=product
    )
    return SplitRates(
        dtype, batch, cpu_alone, cpu_shared, link_alone, link_shared, _handoff(dev, t, batch)
    )


def _handoff(dev: torch.device, dtype: torch.dtype, batch: int, calls: int = 200) -> float:
    """Seconds of one `gpu_cpu_mm` with a token-sized product on each side while the link
    streams weights on a side stream, as it does under a split layer: what the layer pays
    per hand-off on top of its shares (the copies' latency, the wait, the calls). Measured
    on an H200: a small host->GPU copy queued behind a streaming layer waited for all of it
    (3.2 ms), which is why the op brings its result back without the copy engine. Timed
    overlapped, as a generation runs them (backends/gpu_cpu_mm.py `overlapped`): the calls
    queued back to back, then waited for, so the time per call is the slower of the
    launching thread's work and the chain of flags and tasks."""
    x = torch.randn(batch, COLS, device=dev).to(dtype)
    w_gpu = torch.randn(64, COLS, device=dev).to(dtype)
    w_cpu = torch.randn(64, COLS).to(dtype)
    with overlapped():  # its first calls compile the TorchScript tasks
        for _ in range(10):
            gpu_cpu_mm(x, w_gpu, w_cpu)
    torch.cuda.synchronize(dev)
    src = torch.empty(COPY_BYTES, dtype=torch.uint8).pin_memory()
    dst = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    stream = torch.cuda.Stream(dev)
    done = torch.cuda.Event()
    with torch.cuda.stream(stream):  # more than the calls below take: the link stays busy
        for _ in range(max(2, int(calls * 2e-4 * 60e9 / COPY_BYTES) + 1)):
            dst.copy_(src, non_blocking=True)
        done.record(stream)
    t0 = time.perf_counter()
    n = 0
    with overlapped():
        while n < calls and not done.query():
            gpu_cpu_mm(x, w_gpu, w_cpu)
            n += 1
        torch.cuda.current_stream(dev).synchronize()
    seconds = (time.perf_counter() - t0) / max(n, 1)
    torch.cuda.synchronize(dev)
    return seconds


def split_profile(
    cluster: ClusterSpec,
    gpu: DeviceSpec,
    rates: tuple[SplitRates, ...],
    *,
    backend: str = "eager",
    base: CalibrationProfile | None = None,
) -> CalibrationProfile:
    """`base` (or an empty profile of `cluster`) with the CPU's matmul memory efficiency in
    each measured dtype with the link at work, and the host link's bandwidth alone (the
    slowest measured) and beside the CPU's matmuls in each dtype."""
    cpu = cluster.host_cpu(gpu.host)
    base = base or CalibrationProfile(cluster=cluster.name)
    entries = tuple(
        Efficiency(
            key=f"matmul/{r.dtype}",
            compute=0.5,
            memory=r.cpu_shared / (cpu.mem_bandwidth or r.cpu_shared),
            samples=1,
        )
        for r in rates
    )
    keys = {e.key for e in entries}
    devices = []
    found = False
    for dp in base.devices:
        if dp.device == cpu.name and dp.backend == backend:
            keep = tuple(e for e in dp.efficiency if e.key not in keys)
            dp = dataclasses.replace(dp, efficiency=(*keep, *entries))
            found = True
        devices.append(dp)
    if not found:
        devices.append(
            DeviceProfile(
                device=cpu.name,
                kind="cpu",
                model=cpu.model,
                mem_bandwidth=cpu.mem_bandwidth or 0.0,
                efficiency=entries,
                backend=backend,
                threads=torch.get_num_threads(),
            )
        )
    links = tuple(lp for lp in base.links if {lp.a, lp.b} != {cpu.name, gpu.name})
    latency = next((lp.latency for lp in base.links if {lp.a, lp.b} == {cpu.name, gpu.name}), 1e-5)
    alone = min(r.link_alone for r in rates)
    measured = [r.handoff_s for r in rates if r.handoff_s > 0]
    if measured:  # a hand-off is two small copies: each pays half of it
        latency = min(measured) / 2
    by_dtype = tuple((r.dtype, r.link_shared) for r in rates)
    links = (
        *links,
        LinkProfile(cpu.name, gpu.name, alone, latency, shared_by_dtype=by_dtype),
    )
    return CalibrationProfile(
        cluster=cluster.name,
        devices=tuple(devices),
        links=links,
        host=base.host,
        torch_version=torch.__version__,
    )
