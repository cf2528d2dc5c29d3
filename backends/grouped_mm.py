"""`hetero::grouped_mm`: a mixture of experts' grouped matrix product without a host sync.

A mixture-of-experts layer sorts its tokens' rows by expert and multiplies each expert's
run of rows by that expert's weight. transformers' fallback for 16-bit weights
(`transformers::grouped_mm_fallback`, transformers/integrations/moe.py) loops over experts
on the host, reading the runs' bounds with `offs.tolist()`: every call of it waits for the
GPU to go idle, and no CUDA graph can hold it. The small Mixtral of issue 15's suite calls it
8 times a forward (4 layers, two projections each), and each wait exposes the host's
launches: hetero's Inductor program ran 6.2-8.5 ms a call on an H100 host where its kernels'
time was ~4 (backend_suite.md, run 49).

Here one Triton kernel does every expert's product: each program takes one (row tile,
column tile), finds on the device which expert's run its row tile falls in from the runs'
ends (`offs`, as the fallback takes them), and multiplies those rows by that expert's
weight. Nothing waits on the host, so a CUDA graph can capture it. Rows past the last run
are zeros, as the fallback leaves them. On a CPU, or without Triton, the fallback's loop
runs (the host holds `offs` already there).

Registered with `torch.library.custom_op`, so that a program calling it names this module
as the one to import before it is read (backends/library_ops.py).
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Any

import torch

try:  # optional (hetero[triton]); the loop serves without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is absent
    triton = None

log = logging.getLogger(__name__)

# Tiles (rows, columns, depth) and launch settings: 16-bit products use the tensor cores;
# float32 ones run exactly (IEEE), as torch.mm does by default.
TILES = {
    torch.float16: (64, 128, 64, 4, 3),
    torch.bfloat16: (64, 128, 64, 4, 3),
    torch.float32: (32, 64, 32, 4, 2),
}


@torch.library.custom_op("hetero::grouped_mm", mutates_args=())
def grouped_mm(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """Rows `x[offs[e-1]:offs[e]]` (x: [S, K], sorted by expert) times `w[e]` (w: [E, K, N])
    for each expert e; rows past `offs[-1]` are zeros. [S, N] in x's dtype."""
    if (
        x.is_cuda
        and triton is not None
        and x.dtype in TILES
        and w.dtype == x.dtype
        and (torch.cuda.is_current_stream_capturing() or kernel_works(x.dtype, x.device.index))
    ):
        return launch(x, w, offs.to(x.device))  # bounds the host holds: copied once, here
    return looped(x, w, offs)  # mixed dtypes: torch.mm's own error


@grouped_mm.register_fake
def _(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    return x.new_empty((x.shape[0], w.shape[2]))


@functools.cache
def kernel_works(dtype: torch.dtype, index: int | None) -> bool:
    """Whether the kernel compiles and runs on GPU `index` for `dtype`: checked once, on a
    small product against the loop. Every backend's program calls this operator, so a kernel
    that could not compile on some GPU or Triton would fail every candidate of the partition;
    there the loop serves instead, with a warning."""
    dev = torch.device("cuda", index)
    try:
        g = torch.Generator(device=dev).manual_seed(0)
        x = torch.randn(70, 48, device=dev, generator=g).to(dtype)
        w = (torch.randn(3, 48, 40, device=dev, generator=g) / 7).to(dtype)
        offs = torch.tensor([20, 20, 65], device=dev)
        got, want = launch(x, w, offs).float(), looped(x.float(), w.float(), offs)
        works = bool(torch.allclose(got, want, rtol=3e-2, atol=3e-2))
        why = "its values differ from the loop's"
    except Exception as e:  # any failure to build or run it: the loop still answers
        works, why = False, f"{type(e).__name__}: {e}"
    if not works:
        log.warning(
            "hetero::grouped_mm: the Triton kernel does not run on %s for %s (%s); "
            "experts' products run one at a time, waiting on the host",
            dev,
            dtype,
            why[:300],
        )
    return works


def looped(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The product one expert at a time, as transformers' fallback computes it (its bounds
    read on the host)."""
    out = torch.zeros(x.shape[0], w.shape[2], dtype=x.dtype, device=x.device)
    start = 0
    for e, end in enumerate(offs.tolist()):
        if end > start:
            torch.mm(x[start:end], w[e], out=out[start:end])
        start = end
    return out


def launch(x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """The product by `_grouped_mm_kernel`, wherever Triton runs (a GPU, or its interpreter
    on the host)."""
    rows, depth = x.shape
    experts, _, cols = w.shape
    out = torch.zeros(rows, cols, dtype=x.dtype, device=x.device)
    if rows == 0 or cols == 0 or experts == 0:
        return out
    bm, bn, bk, warps, stages = TILES[x.dtype]
    # each expert's run adds at most one partial row tile to the whole rows' tiles
    grid = (triton.cdiv(rows, bm) + experts, triton.cdiv(cols, bn))
    _kernel(os.environ.get("TRITON_INTERPRET") == "1")[grid](
        x, w, offs, out, rows, depth, cols,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w.stride(2),
        out.stride(0), out.stride(1),
        EXPERTS=experts, BM=bm, BN=bn, BK=bk, EXACT=x.dtype == torch.float32,
        num_warps=warps, num_stages=stages,
    )  # fmt: skip
    return out


@functools.cache
def _kernel(interpret: bool) -> Any:
    """The kernel, made on first use: Triton decides at `triton.jit` whether it compiles for
    the GPU or runs in its interpreter (TRITON_INTERPRET), and a test may set that after
    this module is imported. (Triton's own jit helpers, `tl.cdiv` and `tl.zeros`, were
    decided when triton.language was imported: the kernel calls none.)"""
    return triton.jit(_grouped_mm_kernel)


if triton is not None:

    def _grouped_mm_kernel(
        x, w, offs, out, M, K, N,
        sxm, sxk, swe, swk, swn, som, son,
        EXPERTS: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
        EXACT: tl.constexpr,
    ):  # fmt: skip
        tile = tl.program_id(0)
        # Row tiles are numbered expert by expert, each expert's run cut into BM-row tiles:
        # find this program's expert and first row from the runs' ends, on the device.
        seen = 0
        start = 0
        expert = -1
        row0 = 0
        end = 0
        for e in tl.static_range(EXPERTS):
            stop = tl.load(offs + e).to(tl.int32)
            tiles = (stop - start + BM - 1) // BM  # not tl.cdiv: a jit helper (see _kernel)
            hit = (tile >= seen) & (tile < seen + tiles)
            expert = tl.where(hit, e, expert)
            row0 = tl.where(hit, start + (tile - seen) * BM, row0)
            end = tl.where(hit, stop, end)
            seen += tiles
            start = stop
        if expert >= 0:
            # 64-bit offsets: an expert's weight lies past 2**31 elements in a large model
            rows = (row0 + tl.arange(0, BM)).to(tl.int64)
            # within the run and within x: bounds that are not ascending, or run past x's
            # rows, give wrong values (as the loop's slices would) but touch no other memory
            inside = (rows < end) & (rows >= 0) & (rows < M)
            cols = tl.program_id(1) * BN + tl.arange(0, BN)
            acc = tl.full((BM, BN), 0.0, dtype=tl.float32)  # not tl.zeros: a jit helper
            for k0 in range(0, K, BK):
                ks = k0 + tl.arange(0, BK)
                a = tl.load(
                    x + rows[:, None] * sxm + ks[None, :] * sxk,
                    mask=inside[:, None] & (ks[None, :] < K),
                    other=0.0,
                )
                b = tl.load(
                    w + expert.to(tl.int64) * swe + ks[:, None] * swk + cols[None, :] * swn,
                    mask=(ks[:, None] < K) & (cols[None, :] < N),
                    other=0.0,
                )
                if EXACT:
                    acc += tl.dot(a, b, input_precision="ieee")
                else:
                    acc += tl.dot(a, b)
            tl.store(
                out + rows[:, None] * som + cols[None, :] * son,
                acc.to(out.dtype.element_ty),
                mask=inside[:, None] & (cols[None, :] < N),
            )
