"""Tile sizes chosen by measurement, per GPU model and kernel shape, cached on disk.

The cache is one JSON file per GPU model (kernel key -> config); a kernel key hashes the
kernel's source and its shapes, so the same layer in another model reuses the choice.
Tuning runs each candidate launcher on the partition's real intermediate tensors (caught
while `forward` runs once on the example inputs) and keeps the fastest.

On a GPU every candidate of every kernel is compiled first, in a pool of threads, and only
then timed one by one: compiling, not timing, is most of tuning (a Triton compile takes
0.2-2 s, a config's timing some 50 ms), and a compile spends much of its time in ptxas
(a subprocess) and in native passes, so threads overlap them as Inductor's
select_algorithm precompiles its template choices in a thread pool. The threads only
compile (`JITFunction.warmup`, in Triton 3.6 and 3.9 alike), into the same in-memory
kernel cache the timing's launches then hit. Every other kernel of the program is compiled
in them too: the forward that finds each launch's arguments defers its compiles to the pool
instead of compiling and running kernel after kernel (`precompile`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetero.backends.gpu_turn import timing_turn
from hetero.backends.triton import tile_model
from hetero.backends.triton.kernels import attention, decode, matmul_epilogue
from hetero.backends.triton.tile_model import Gemm, Gpu

log = logging.getLogger("hetero.triton.autotune")

_MATMUL = tuple(matmul_epilogue.as_cfg(c) for c in matmul_epilogue.CANDIDATES)
CANDIDATES: dict[str, tuple[dict, ...]] = {
    "matmul": _MATMUL,
    # two fp32 accumulators: tiles up to 128 x 128 keep them in registers
    "gated": tuple(c for c in _MATMUL if c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128),
    "attention": tuple(attention.as_cfg(c) for c in attention.CANDIDATES),
    "decode": tuple(decode.as_cfg(c) for c in decode.CANDIDATES),
}
# Matmul configs compiled and timed per kernel by default, the most promising by tile_model:
# of the 14, most are out of the running on any one shape, and each costs a compile (GPT-2
# small: 61 configs, 6.9 s of an 11 s Triton compile; run 52). Over the 26 tuned matmuls of
# runs 51 and 53 (GPT-2, BERT, the 1.1B LLaMA prefill, Mixtral) the fastest of the model's
# top 8 was the fastest of all 14 on every kernel; its top 6 lost 0.4% summed, 9% on one
# kernel (benchmarks/tile_model_eval.py). `CompileOptions.tune_trials` keeps more or fewer.
MATMUL_KEEP = 8


def candidates(kernel: Any, gpu: Gpu | None = None, trials: int = 0) -> tuple[dict, ...]:
    """Configs worth trying for a kernel, at most `trials` (0: all, or for a matmul on a
    known `gpu` MATMUL_KEEP): tiles no larger than its (padded) output; for a matmul on
    `gpu`, the most promising first by tile_model's estimate, those that cannot fit left out."""
    cands = CANDIDATES[kernel.kind]
    if kernel.kind not in ("matmul", "gated") or len(kernel.space) != 3:
        return cands[: trials or None]
    _, m, n = kernel.space
    fit = tuple(
        c for c in cands
        if c["BLOCK_M"] <= max(16, 1 << (m - 1).bit_length())
        and c["BLOCK_N"] <= max(16, 1 << (n - 1).bit_length())
    ) or cands  # fmt: skip
    if gpu is None or not kernel.flops:
        return fit[: trials or None]
    gemm = Gemm.of_kernel(kernel.kind, kernel.space, kernel.flops, kernel.bytes)
    return (tile_model.ranked(fit, gemm, gpu) or fit)[: trials or MATMUL_KEEP]


def cache_file(root: Path, gpu_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return root / f"{slug}.json"


@dataclass(frozen=True)
class TuneCache:
    """Configs by kernel key for one GPU model, read from and written to `path`."""

    path: Path

    def read(self) -> dict[str, dict]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def write(self, found: Mapping[str, dict]) -> None:
        table = self.read()
        table.update(found)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(self.path)  # atomic: parallel compiles never see half a file


# Threads that compile candidate configs before they are timed (1: compile as each is timed).
PRECOMPILE_THREADS = max(1, min(16, os.cpu_count() or 1))
# Their priority (a nice value): the measured choice compiles this candidate while a warming
# process compiles Inductor's (backends/warming.py), whose long single-threaded stretches
# (lowering, scheduling) set when the compile ends; at a lower priority these threads fill
# the cores it leaves idle instead of slowing it.
YIELD_NICE = 10


@dataclass(frozen=True)
class Tuned:
    """What `tune` found and what it took."""

    found: dict[str, dict] = field(default_factory=dict)  # kernel key -> fastest config
    kernels: int = 0  # kernels measured
    configs: int = 0  # configs timed over them
    compile_s: float = 0.0  # seconds compiling configs ahead of their timing (GPU threads)


def tune(
    module: Any,
    kernels: Sequence[Any],
    run: Callable[[], object],
    known: Mapping[str, dict],
    trials: int = 0,
    device: torch.device | None = None,
    threads: int = PRECOMPILE_THREADS,
) -> Tuned:
    """Measure candidate configs of `kernels` (codegen.Kernel) not in `known`.

    Wraps each such launcher of the loaded program `module`, calls `run()` once (which runs
    `forward` on example inputs), and returns key -> fastest config. On a CUDA `device`
    with `threads` > 1, a first `run()` compiles every candidate in `threads` threads.
    """
    from triton.testing import do_bench  # optional (hetero[triton]): loaded on first use

    pending = [k for k in kernels if k.kind in CANDIDATES and k.key not in known]
    if not pending:
        return Tuned()
    compile_s = 0.0
    gpu = _gpu(device)
    if device is not None and device.type == "cuda" and threads > 1:
        start = time.perf_counter()
        precompile(module, pending, run, trials, device, threads, gpu)
        compile_s = time.perf_counter() - start
    found: dict[str, dict] = {}
    originals: dict[str, Callable] = {}
    timed = [0]
    for k in pending:
        launcher = getattr(module, f"launch_{k.name}")
        originals[k.name] = launcher
        cands = candidates(k, gpu, trials)

        def wrapped(*args, _k=k, _launch=launcher, _cands=cands, cfg=None):
            if _k.key not in found:
                best, best_ms = None, float("inf")
                measured = []
                for c in _cands:
                    timed[0] += 1
                    try:
                        ms = do_bench(lambda c=c: _launch(*args, cfg=c), warmup=5, rep=25)
                    except Exception:  # a tile that does not fit this GPU (shared memory)
                        continue
                    measured.append([round(ms, 5), c])
                    if ms < best_ms:
                        best, best_ms = c, ms
                if log.isEnabledFor(logging.DEBUG):
                    # every config's time (`--log debug`): the data to judge which configs
                    # are worth their compile (most of tuning's time) on which shapes
                    log.debug("tuned %s %s space=%s flops=%d: %s", _k.name, _k.kind, _k.space,
                              _k.flops, json.dumps(sorted(measured, key=lambda m: m[0])))  # fmt: skip
                if best is not None:
                    found[_k.key] = dict(best, ms=round(best_ms, 5))
            cfg = found.get(_k.key)
            return _launch(*args, cfg={x: v for x, v in cfg.items() if x != "ms"} if cfg else None)

        setattr(module, f"launch_{k.name}", wrapped)
    try:
        with timing_turn(device) if device is not None else contextlib.nullcontext():
            run()
    finally:
        for name, fn in originals.items():
            setattr(module, f"launch_{name}", fn)
    return Tuned(found, len(pending), timed[0], compile_s)


def precompile(
    module: Any,
    kernels: Sequence[Any],
    run: Callable[[], object],
    trials: int,
    device: torch.device,
    threads: int,
    gpu: Gpu | None = None,
) -> None:
    """Compile every kernel of `module` and every candidate config of `kernels` in
    `threads` threads, launching none.

    `run()` runs `forward` once in this thread with every launch deferred: a kernel's
    `kernel[grid](...)` hands its compile (`JITFunction.warmup` with the launch's real
    arguments, hence the key the timing's launches look up) to the pool and launches
    nothing, and the first call of each tuned kernel's launcher also hands over one compile
    per candidate config. Before, this thread compiled and ran each kernel in turn, one
    compile after another: MobileNetV3-L's 47 kernels took 7.2 s of "autotune compile" for 8
    candidate configs (run 53). A launcher's fresh outputs come back zeroed, not computed,
    so that what reads them (an index, an expert's routing) sees valid values; the pass's
    results are thrown away."""
    local = threading.local()
    tuned = {k.name: k for k in kernels}
    launchers = {n: f for n, f in vars(module).items() if n.startswith("launch_") and callable(f)}
    # the kernels the launchers launch (a split decode's `_merge` too), and no other @jit
    # global: a kernel's body may call one (the reductions' combiners), and Triton reads
    # those from the module's globals when it compiles and checks them at each launch
    named = {n.removeprefix("launch_") for n in launchers}
    jitted = {
        n: f
        for n, f in vars(module).items()
        if n.removesuffix("_merge") in named and callable(getattr(f, "warmup", None))
    }
    jobs: list[Future] = []
    asked: set[tuple] = set()
    submitted: set[str] = set()  # tuned kernels whose candidates are handed over
    pool = ThreadPoolExecutor(threads, thread_name_prefix="hetero-tune", initializer=_yield_cores)

    def warm(fn: Any, grid: Any, args: tuple, kwargs: dict) -> None:
        # A kernel that fails to compile here fails its launch (or its timing) again later,
        # which reports (or skips) it. Triton compiles for the thread's current device.
        with contextlib.suppress(Exception), _on(device):
            fn.warmup(*args, grid=grid, **kwargs)

    def defer(fn: Any, grid: Any, args: tuple, kwargs: dict) -> None:
        key = (id(fn), _compile_key(args), _compile_key(tuple(sorted(kwargs.items()))))
        if key not in asked:  # a layer's kernel again, with the same arguments
            asked.add(key)
            jobs.append(pool.submit(warm, fn, grid, args, kwargs))

    def compile_only(launch: Callable, args: tuple, cfg: dict) -> None:
        local.compile_only = True
        with contextlib.suppress(Exception), _on(device):
            launch(*args, cfg=cfg)

    def deferring(name: str, launch: Callable) -> Callable:
        k = tuned.get(name.removeprefix("launch_"))
        cands = candidates(k, gpu, trials) if k is not None else ()

        def launch_deferred(*args, cfg=None):
            if cands and k.name not in submitted:
                submitted.add(k.name)
                jobs.extend(pool.submit(compile_only, launch, args, c) for c in cands[1:])
            out = launch(*args, cfg=cands[0] if cands else cfg)
            _zero_fresh(out, args)
            return out

        return launch_deferred

    for name, fn in jitted.items():
        _bind_device_cache(fn, device)  # before threads race to make it (Triton makes it lazily)
        setattr(module, name, _CompileOnly(fn, local, defer))
    for name, fn in launchers.items():
        setattr(module, name, deferring(name, fn))
    local.defer = True
    try:
        try:
            run()
        except Exception as e:
            # an op met a zero the pass left where a kernel's values belong (an assert on
            # data); what the pass reached is compiled, the timing's run compiles the rest
            log.info("precompile stopped early, the rest compiles as it is timed: %s", e)
        for job in jobs:  # none is added after run() returns: only this thread defers
            job.result()
    finally:
        local.defer = False
        pool.shutdown(wait=True, cancel_futures=True)
        for name, fn in jitted.items():
            setattr(module, name, fn)
        for name, fn in launchers.items():
            setattr(module, name, fn)


def _on(device: torch.device) -> contextlib.AbstractContextManager:
    """The compiling thread's current device: `device` where it is a GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _compile_key(values: tuple) -> tuple:
    """What of a launch's arguments a compile depends on, hashable: a tensor's dtype, shape,
    strides and 16-byte alignment, any other value itself (its repr where unhashable)."""
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            out.append((v.dtype, tuple(v.shape), v.stride(), v.data_ptr() % 16 == 0))
        elif isinstance(v, tuple):
            out.append(_compile_key(v))
        else:
            try:
                hash(v)
                out.append(v)
            except TypeError:
                out.append(repr(v))
    return tuple(out)


def _zero_fresh(out: object, args: tuple) -> None:
    """Zeroes the tensors of `out` that a launcher allocated (none of `args` shares their
    storage): its kernel never ran, and what reads them must not meet garbage (an index
    out of range would fault the device)."""
    given = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
    for t in out if isinstance(out, tuple | list) else (out,):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in given:
            t.zero_()


def _bind_device_cache(fn: Any, device: torch.device) -> None:
    """Makes a Triton JIT function's per-device kernel cache for `device` in this thread, so
    that pool threads compiling into it at once share one (Triton 3.x makes it lazily, per
    device, on first use: two threads could each make one, and a compile kept in the lost
    one would be compiled again at its launch). Nothing where Triton keeps none."""
    caches = getattr(fn, "device_caches", None)
    if device.type == "cuda" and isinstance(caches, dict):
        with contextlib.suppress(Exception), torch.cuda.device(device):
            caches[torch.cuda.current_device()]


def _gpu(device: torch.device | None) -> Gpu | None:
    """tile_model's view of `device`, where it is a GPU."""
    if device is None or device.type != "cuda":
        return None
    return Gpu.of(torch.cuda.get_device_properties(device))


def _yield_cores() -> None:
    """Lowers the calling thread's priority to YIELD_NICE (Linux sets it per thread; its
    ptxas processes inherit it); where the system refuses, it stays as it is."""
    with contextlib.suppress(OSError, AttributeError):
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, max(YIELD_NICE, os.getpriority(os.PRIO_PROCESS, tid)))


class _CompileOnly:
    """A kernel global that launches nothing while precompiling: in a pool thread
    (`local.compile_only`) `kernel[grid](...)` compiles; in the thread running the deferred
    forward (`local.defer`) it hands the compile to `defer(fn, grid, args, kwargs)`."""

    def __init__(self, fn: Any, local: threading.local, defer: Callable) -> None:
        self.fn = fn
        self.local = local
        self.defer = defer

    def __getitem__(self, grid: Any) -> Callable:
        if getattr(self.local, "compile_only", False):
            return lambda *args, **kwargs: self.fn.warmup(*args, grid=grid, **kwargs)
        if getattr(self.local, "defer", False):
            return lambda *args, **kwargs: self.defer(self.fn, grid, args, kwargs)
        return self.fn[grid]
