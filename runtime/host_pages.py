"""Host memory in transparent huge pages, for the weights a host CPU reads every token.

A decode step on the host CPU streams each weight from DRAM once per token (hetero::gemv,
oneDNN): bound by bytes, not arithmetic. In 4 KiB pages a 7B layer's 404 MB is ~100,000
pages, and the read walks a new page table entry every 64 cache lines; in 2 MiB pages it is
~200. Where the kernel hands out huge pages only on request (`madvise`, the usual
distribution default), torch's allocator does not ask (c10 asks only under
THP_MEM_ALLOC_ENABLE=1, read once per process, before the model's weights exist).

`collapse` re-backs a tensor's own memory with huge pages in place (Linux 6.1's
MADV_COLLAPSE): no second copy of a model's weights in RAM, nothing to set before torch
loads. Where the platform cannot (not Linux, THP off, a kernel before 6.1, pinned memory)
the tensor stays as it is: the pages are an optimisation, never a requirement.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
# Smaller tensors (norm weights, biases) gain nothing: they sit in a cache or one page.
MIN_BYTES = 4 * HUGE_PAGE
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MADV_COLLAPSE = 25  # linux/mman.h, since 6.1; Python's mmap module names it from 3.13 only
# The kernel collapses a range page by page on the calling thread (~0.4 GB/s on the 2-core
# box): a 7B's CPU layers are GBs, so the ranges go to a few threads (ctypes drops the GIL).
_CHUNK = 32 * HUGE_PAGE


def thp_mode() -> str:
    """The kernel's transparent huge page mode ("always", "madvise", "never"), or "" where
    it cannot be read (not Linux, a container without /sys)."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return ""
    start, end = text.find("["), text.find("]")
    return text[start + 1 : end] if 0 <= start < end else ""


def available() -> bool:
    """Whether `collapse` may find huge pages here."""
    return thp_mode() in ("always", "madvise")


def _madvise() -> ctypes._CFuncPtr | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def collapse(tensors: list[torch.Tensor], threads: int | None = None) -> int:
    """Re-back the 2 MiB-aligned interior of each large, unpinned host tensor with huge
    pages, in place (contents unchanged). Returns the bytes now in huge pages (0 where the
    kernel cannot: then nothing changed)."""
    madvise = _madvise() if available() else None
    if madvise is None:
        return 0
    ranges = []
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if t.device.type != "cpu" or nbytes < MIN_BYTES or t.is_pinned():
            continue
        start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
        end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
        ranges += [(a, min(a + _CHUNK, end)) for a in range(start, end, _CHUNK)]
    if not ranges:
        return 0

    def one(r: tuple[int, int]) -> int:
        return r[1] - r[0] if madvise(r[0], r[1] - r[0], MADV_COLLAPSE) == 0 else 0

    workers = threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers, thread_name_prefix="hetero-thp") as pool:
        return sum(pool.map(one, ranges))
