"""Which matmul tile configs are worth compiling: a wave-and-traffic estimate per config.

Compiling, not timing, is most of autotuning (autotune.py): GPT-2 small's 61 configs took
8.8 s of a 12.3 s Triton compile on an H100 host (run 49), beside Inductor's warming on the
same cores. This model ranks a kernel's configs so that only the few most promising are
compiled and timed; the timing still picks among those. It is the usual first-order model of
a tiled GEMM (Triton's early `estimate_matmul_time`, CUTLASS's wave-quantization reasoning):

- occupancy: how many of the config's CTAs fit on one SM at once, by shared memory (the
  pipeline's stages of A and B tiles), threads and registers (the fp32 accumulators);
- waves: the output's tiles over all SMs' slots, rounded up, so a config that leaves most
  SMs idle in its last wave pays for the whole wave;
- per wave: the larger of the SM's tensor work and its tiles' operand traffic, both shared
  by the CTAs resident on the SM;
- tiles below 64 rows or columns run the tensor cores below their width.

Absolute units cancel in the ranking: work is counted in multiply-adds and traffic in bytes
scaled by a flops-per-byte ratio of a recent data-center GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

# flops a GPU computes per byte its SMs read from L2 (H100: ~990 TFLOP/s of fp16 tensor work
# against ~10 TB/s of L2 reads) and from DRAM (~3.3 TB/s)
FLOPS_PER_L2_BYTE = 100.0
FLOPS_PER_DRAM_BYTE = 300.0
REGISTERS_PER_SM = 65536
# registers a thread needs besides its share of the accumulators (addresses, loop state,
# the operands of the tensor instructions)
REGISTER_OVERHEAD = 64
MAX_REGISTERS_PER_THREAD = 255


@dataclass(frozen=True)
class Gpu:
    """What the estimate needs of a GPU (torch.cuda.get_device_properties)."""

    sms: int
    shared_bytes: int  # shared memory per SM
    threads: int  # resident threads per SM

    @classmethod
    def of(cls, props: Any) -> Gpu:
        return cls(
            sms=int(props.multi_processor_count),
            shared_bytes=int(getattr(props, "shared_memory_per_multiprocessor", 228 << 10)),
            threads=int(getattr(props, "max_threads_per_multi_processor", 2048)),
        )


@dataclass(frozen=True)
class Gemm:
    """One launch's problem: `batch` products of (m x k) by (k x n), `operands` B matrices
    sharing each A tile (2 for a gated MLP), elements of `elem` bytes."""

    batch: int
    m: int
    n: int
    k: int
    operands: int = 1
    elem: int = 2

    @classmethod
    def of_kernel(cls, kind: str, space: tuple[int, ...], flops: int, traffic: int = 0) -> Gemm:
        """The product a matmul kernel of `kind` ("matmul" or "gated") computes over its
        iteration `space` (batch, rows, columns), from its work in flops and, where known, its
        `traffic` in bytes (else 16-bit elements)."""
        b, m, n = space
        operands = 2 if kind == "gated" else 1
        k = max(1, round(flops / (2 * b * m * n * operands)))
        elements = b * (m * k + operands * k * n + m * n)
        elem = 4 if traffic >= 3.5 * elements else 2
        return cls(b, m, n, k, operands, elem)


def resident(cfg: dict, gemm: Gemm, gpu: Gpu) -> int:
    """How many CTAs of `cfg` one SM holds at once (0: the config does not fit)."""
    bm, bn, bk = cfg["BLOCK_M"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    threads = 32 * cfg["num_warps"]
    shared = cfg["num_stages"] * (bm * bk + gemm.operands * bk * bn) * gemm.elem
    per_thread = gemm.operands * bm * bn / threads + REGISTER_OVERHEAD
    if shared > gpu.shared_bytes or per_thread > MAX_REGISTERS_PER_THREAD * 2:
        return 0
    regs = threads * min(MAX_REGISTERS_PER_THREAD, per_thread)
    return max(
        0, min(gpu.shared_bytes // shared, gpu.threads // threads, int(REGISTERS_PER_SM // regs))
    )


def estimate(cfg: dict, gemm: Gemm, gpu: Gpu) -> float:
    """A time for `cfg` on `gemm`, in arbitrary units (lower is faster); inf where it does
    not fit on the SM."""
    per_sm = resident(cfg, gemm, gpu)
    if per_sm == 0:
        return math.inf
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    tiles = gemm.batch * math.ceil(gemm.m / bm) * math.ceil(gemm.n / bn)
    waves = math.ceil(tiles / (gpu.sms * per_sm))
    active = min(per_sm, math.ceil(tiles / gpu.sms))  # CTAs sharing an SM in a full wave
    k = math.ceil(gemm.k / cfg["BLOCK_K"]) * cfg["BLOCK_K"]
    width = min(1.0, bm / 64) * min(1.0, bn / 64)  # tensor-core use of narrow tiles
    work = active * gemm.operands * bm * bn * k * 2 / width
    traffic = active * (bm + gemm.operands * bn) * k * gemm.elem * FLOPS_PER_L2_BYTE
    # one stage of the pipeline cannot hide a load behind a product
    exposed = 1.5 if cfg["num_stages"] < 2 else 1.0
    wave = max(work, traffic) * exposed
    # the whole problem from DRAM once: a floor no tiling beats, spread over all SMs
    dram = (gemm.m * gemm.k + gemm.operands * gemm.k * gemm.n + gemm.m * gemm.n) * gemm.batch
    floor = dram * gemm.elem * FLOPS_PER_DRAM_BYTE / gpu.sms
    return max(waves * wave, floor)


def ranked(cands: tuple[dict, ...], gemm: Gemm, gpu: Gpu) -> tuple[dict, ...]:
    """`cands` fastest first by `estimate`, those that do not fit left out; stable among
    equal estimates (the candidates' own order)."""
    timed = [(estimate(c, gemm, gpu), i, c) for i, c in enumerate(cands)]
    return tuple(c for t, _, c in sorted(timed, key=lambda x: (x[0], x[1])) if t != math.inf)
