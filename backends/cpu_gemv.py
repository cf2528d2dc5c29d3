"""`hetero::gemv`: a host CPU's `F.linear(x, w, b)` for a few rows of x against 16-bit
weights, as a kernel that reads the weights at the host's memory rate.

Why: a decode step at batch 1 multiplies one token by every weight of the CPU's layers, so
the CPU's share of a step is its weight bytes over the rate its product reads them. torch's
16-bit matrix-vector product reads far below what the same host reads in a plain reduction:
on an H100 host's Xeon (16 threads, run 44) `torch.mm` read 63.9 GB/s where `t.sum()` read
86.5 and the split calibration's faster product 87.5, and two 7B decode layers ran in 10.79
ms through Inductor's program with it, 13.88 without (benchmarks/cpu_gemv_kernels.py,
llm_generate_gpu.py; BENCHMARKS.md); on the 2-core development box (AMD EPYC, AVX2) a
float16 decode program with it ran 38.4 ms against 53.0 op by op
(benchmarks/packed_linear_cpu.py --dtype float16).
Each thread here takes a block of four weight rows at a time, widens them to float32 in
registers and accumulates four dot products at once, so the loads stream at the rate the
memory gives and the arithmetic hides behind them.

It is one more candidate of the CPU decode program's measured choice
(runtime/generation.py; runtime/measured_choice.py), never forced: where it is slower, or
cannot be built, the choice keeps another program.

The kernel is C++ built once per process (and cached on disk) by Inductor's C++ builder, the
compiler and flags torch.compile uses for its own CPU kernels on this machine (native vector
instructions, OpenMP), and called through ctypes, which releases the GIL while it runs.
Registered through `torch.library.Library` as backends/gpu_cpu_mm.py's ops are (a kernel per
dispatch key: less Python per call than `custom_op`), so a program run op by op and
Inductor's program (an extern call) both call it.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx

log = logging.getLogger(__name__)

# The most rows of x the kernel takes: each extra row is another pass of arithmetic over
# weights already in cache; past a few rows a blocked GEMM (oneDNN) reuses them better.
MAX_ROWS = 4

_DTYPE_CODE = {torch.float16: 0, torch.bfloat16: 1}

_SOURCE = r"""
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <memory>

// 16-bit weights widened to float32 in registers: float16 by the F16C conversion, bfloat16
// by a shift (it is the upper half of a float32).
#if defined(__AVX512F__)
typedef __m512 vec;
static const int64_t W = 16;
static inline vec vzero() { return _mm512_setzero_ps(); }
static inline vec vload(const float* p) { return _mm512_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm512_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm512_fmadd_ps(a, b, c); }
static inline float vsum(vec a) { return _mm512_reduce_add_ps(a); }
static inline vec widen_f16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
static inline vec widen_bf16(const uint16_t* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
#else
typedef __m256 vec;
static const int64_t W = 8;
static inline vec vzero() { return _mm256_setzero_ps(); }
static inline vec vload(const float* p) { return _mm256_loadu_ps(p); }
static inline void vstore(float* p, vec v) { _mm256_storeu_ps(p, v); }
static inline vec vfma(vec a, vec b, vec c) { return _mm256_fmadd_ps(a, b, c); }
static inline float vsum(vec a) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  return _mm_cvtss_f32(s);
}
static inline vec widen_f16(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p));
}
static inline vec widen_bf16(const uint16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
#endif

static inline float f16_to_f32(uint16_t h) { return _cvtsh_ss(h); }
static inline float bf16_to_f32(uint16_t h) {
  uint32_t u = (uint32_t)h << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}
static inline uint16_t f32_to_f16(float f) { return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT); }
static inline uint16_t f32_to_bf16(float f) {  // round to nearest even, as torch does
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffff) > 0x7f800000) return (uint16_t)((u >> 16) | 0x40);  // NaN stays NaN
  u += 0x7fff + ((u >> 16) & 1);
  return (uint16_t)(u >> 16);
}

template <bool BF16>
static void gemv(const uint16_t* x, const uint16_t* w, const uint16_t* b, uint16_t* y,
                 int64_t M, int64_t N, int64_t K, int threads) {
  const int64_t R = 4;
  const int64_t blocks = (N + R - 1) / R;
#pragma omp parallel num_threads(threads)
  {
    // x widened once per thread (read from L1/L2 after), in vectors: a scalar loop over a
    // 11008-wide x cost ~10 us per call per thread
    std::unique_ptr<float[]> xbuf(new float[M * K]);
    float* xf = xbuf.get();
    int64_t i = 0;
    for (; i + W <= M * K; i += W) vstore(xf + i, BF16 ? widen_bf16(x + i) : widen_f16(x + i));
    for (; i < M * K; ++i) xf[i] = BF16 ? bf16_to_f32(x[i]) : f16_to_f32(x[i]);
#pragma omp for schedule(static)
    for (int64_t blk = 0; blk < blocks; ++blk) {
      const int64_t n0 = blk * R;
      const int64_t rows = (N - n0) < R ? (N - n0) : R;
      const uint16_t* wr[4];
      for (int64_t r = 0; r < R; ++r) wr[r] = w + (n0 + (r < rows ? r : 0)) * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xm = xf + m * K;
        vec a0 = vzero(), a1 = vzero(), a2 = vzero(), a3 = vzero();
        int64_t k = 0;
        for (; k + W <= K; k += W) {
          vec xv = vload(xm + k);
          a0 = vfma(BF16 ? widen_bf16(wr[0] + k) : widen_f16(wr[0] + k), xv, a0);
          a1 = vfma(BF16 ? widen_bf16(wr[1] + k) : widen_f16(wr[1] + k), xv, a1);
          a2 = vfma(BF16 ? widen_bf16(wr[2] + k) : widen_f16(wr[2] + k), xv, a2);
          a3 = vfma(BF16 ? widen_bf16(wr[3] + k) : widen_f16(wr[3] + k), xv, a3);
        }
        float s[4] = {vsum(a0), vsum(a1), vsum(a2), vsum(a3)};
        for (int64_t r = 0; r < rows; ++r) {
          for (int64_t kk = k; kk < K; ++kk)
            s[r] += (BF16 ? bf16_to_f32(wr[r][kk]) : f16_to_f32(wr[r][kk])) * xm[kk];
          if (b) s[r] += BF16 ? bf16_to_f32(b[n0 + r]) : f16_to_f32(b[n0 + r]);
          y[m * N + n0 + r] = BF16 ? f32_to_bf16(s[r]) : f32_to_f16(s[r]);
        }
      }
    }
  }
}

extern "C" void hetero_gemv(const uint16_t* x, const uint16_t* w, const uint16_t* b,
                            uint16_t* y, int64_t M, int64_t N, int64_t K, int64_t dtype,
                            int64_t threads) {
  if (dtype == 1)
    gemv<true>(x, w, b, y, M, N, K, (int)threads);
  else
    gemv<false>(x, w, b, y, M, N, K, (int)threads);
}
"""


@functools.cache
def _kernel() -> Any:
    """The built kernel's entry point, or None where it cannot be built here (no C++
    compiler, a CPU without AVX2/F16C): said once in the log."""
    try:
        # Inductor's builder (its compile machinery, ~1 s to import) on the first build only
        from torch._inductor.codecache import CppCodeCache

        fn = CppCodeCache.load(_SOURCE).hetero_gemv
    except Exception as e:  # a compiler's or loader's error: the choice keeps the others
        log.warning("hetero::gemv: the host CPU kernel could not be built (%s); not used", e)
        return None
    fn.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5
    fn.restype = None
    return fn


def available() -> bool:
    """Whether the kernel builds and runs on this host (builds it on the first call)."""
    return _kernel() is not None


def takes(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether the kernel computes `F.linear(x, w, b)` for these tensors: host tensors of one
    16-bit dtype, at most MAX_ROWS rows of x, a weight laid out row by row."""
    return (
        w.dtype in _DTYPE_CODE
        and x.dtype == w.dtype
        and x.device.type == "cpu"
        and w.device.type == "cpu"
        and w.dim() == 2
        and w.is_contiguous()
        and x.numel() // max(1, x.shape[-1]) <= MAX_ROWS
        and (b is None or (b.dtype == w.dtype and b.is_contiguous() and b.device.type == "cpu"))
    )


def _gemv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    fn = _kernel() if takes(x, w, b) else None
    if fn is None:
        return F.linear(x, w, b)
    flat = x.reshape(-1, x.shape[-1]).contiguous()
    rows, n = flat.shape[0], w.shape[0]
    y = torch.empty((rows, n), dtype=w.dtype)
    fn(
        flat.data_ptr(),
        w.data_ptr(),
        b.data_ptr() if b is not None else None,
        y.data_ptr(),
        rows,
        n,
        w.shape[1],
        _DTYPE_CODE[w.dtype],
        torch.get_num_threads(),
    )
    return y.reshape(*x.shape[:-1], n)


def _gemv_fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    return x.new_empty((*x.shape[:-1], w.shape[0]))


_LIB = torch.library.Library("hetero", "FRAGMENT")
_LIB.define("gemv(Tensor x, Tensor w, Tensor? b=None) -> Tensor")
_LIB.impl("gemv", _gemv, "CPU")
torch.library.register_fake("hetero::gemv", _gemv_fake, lib=_LIB)
gemv = torch.ops.hetero.gemv.default


def route_gemv(gm: fx.GraphModule) -> int:
    """Routes `gm`'s `aten.linear` calls on 16-bit weights that are inputs of the program
    through `hetero::gemv` (in place; after backends.linear_fold.fold_linears). Returns how
    many: none where the kernel cannot be built here."""
    routed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        w = node.args[1]
        if not isinstance(w, fx.Node) or w.op != "placeholder":
            continue  # a weight inside the program: a constant, not what decode streams
        val = w.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.dtype not in _DTYPE_CODE:
            continue
        if not available():
            return 0
        node.target = gemv
        routed += 1
    if routed:
        gm.recompile()
    return routed
