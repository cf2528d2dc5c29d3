"""A CUDA stream that waits for, or writes, a 32-bit flag in pinned host memory: the driver's
stream memory operations (`cuStreamWaitValue32`, `cuStreamWriteValue32`).

They let the GPU and a host thread hand work to each other without the host launching
anything at the moment of the hand-off: the host queues "wait until the flag says n, then
run what follows" long before the value arrives, and whoever computes the value sets the
flag. backends/gpu_cpu_mm.py uses them so the thread that launches a decode step's kernels
never waits for the host CPU's share of a split layer (it was ~1.9 ms of every 4.6 ms
layer on an H200, BENCHMARKS.md run 14).

torch does not bind these calls, so they are called through ctypes on the driver library
the CUDA runtime has already loaded. `StreamFlags.load()` returns None (and callers keep
their synchronous path) wherever they are missing or a probe of them fails: no NVIDIA
driver, an old one, a platform whose pinned memory the GPU cannot address.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

log = logging.getLogger(__name__)

_WAIT_EQ = 0x1  # CU_STREAM_WAIT_VALUE_EQ
_WRITE_DEFAULT = 0x0  # CU_STREAM_WRITE_VALUE_DEFAULT: a memory fence before the write


class StreamFlags:
    """The driver's 32-bit stream wait and write on pinned host flags (int32 tensors)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self._wait = _symbol(lib, "cuStreamWaitValue32")
        self._write = _symbol(lib, "cuStreamWriteValue32")
        self._device_ptr = _symbol(lib, "cuMemHostGetDevicePointer")
        for fn in (self._wait, self._write):
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
        self._device_ptr.argtypes = [
            ctypes.POINTER(ctypes.c_uint64),
            ctypes.c_void_p,
            ctypes.c_uint,
        ]
        self._device_ptr.restype = ctypes.c_int

    @staticmethod
    @functools.cache
    def load() -> StreamFlags | None:
        """The driver's calls after a probe on the current device, or None (logged why)."""
        if not torch.cuda.is_available() or torch.version.cuda is None:
            return None
        try:
            torch.cuda.init()
            flags = StreamFlags(ctypes.CDLL("libcuda.so.1"))
            flags._probe()
        except (OSError, AttributeError, RuntimeError) as e:
            log.info("stream memory operations unavailable (%s): hand-offs stay synchronous", e)
            return None
        return flags

    def address(self, flag: torch.Tensor) -> int:
        """The device address of the pinned `flag` (one int32 element)."""
        if flag.dtype != torch.int32 or flag.numel() != 1 or not flag.is_pinned():
            raise ValueError("a stream flag is one int32 element of pinned host memory")
        out = ctypes.c_uint64()
        _check(self._device_ptr(ctypes.byref(out), flag.data_ptr(), 0), "cuMemHostGetDevicePointer")
        return out.value

    def wait(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """Work queued on `stream` after this runs once the flag at `address` equals `value`."""
        _check(self._wait(stream.cuda_stream, address, value, _WAIT_EQ), "cuStreamWaitValue32")

    def write(self, stream: torch.cuda.Stream, address: int, value: int) -> None:
        """Set the flag at `address` to `value` once the work queued before on `stream` is
        done (its writes visible first)."""
        _check(
            self._write(stream.cuda_stream, address, value, _WRITE_DEFAULT),
            "cuStreamWriteValue32",
        )

    def _probe(self) -> None:
        """Write a flag from the GPU, wait on it, and read it back on the host."""
        flag = torch.zeros(1, dtype=torch.int32).pin_memory()
        stream = torch.cuda.Stream()
        at = self.address(flag)
        self.write(stream, at, 7)
        self.wait(stream, at, 7)
        stream.synchronize()
        if int(flag[0]) != 7:
            raise RuntimeError("a flag the GPU wrote did not reach host memory")


def _symbol(lib: ctypes.CDLL, name: str):
    """`name`'s newest ABI: CUDA 12 added the `_v2` calls, and CUDA 13 drivers may lack the
    first ones."""
    for candidate in (f"{name}_v2", name):
        fn = getattr(lib, candidate, None)
        if fn is not None:
            return fn
    raise AttributeError(f"the CUDA driver has no {name}")


def _check(status: int, call: str) -> None:
    if status != 0:
        raise RuntimeError(f"{call} failed with CUresult {status}")
