"""`hetero::gpu_cpu_mm`: one matmul computed by a GPU and its host CPU at once, each on its
share of the weight's rows (the `split` placement, partitioner/gpu_cpu_split.py).

A custom op rather than Python in a graph: a compiler sees one opaque call with known output
shapes and fuses the rest of the program around it; torch.export records it as one node.
Importing this module registers the op.

The CPU's rows come back to the GPU without the copy engine: a split layer streams its GPU
rows over the link on a side stream, and the copy engine serves copies in the order they were
queued, so a 13 KB result copied back waited for the whole layer in flight (3.2 ms measured
on an H200, against 0.013 ms alone; `benchmarks/split_layer_gpu.py`). The GPU reads the
result straight from pinned host memory instead (a kernel's loads, which the copy engine
does not order).
"""

from __future__ import annotations

import math
import threading
import warnings

import torch


class _Staging(threading.local):
    """One pinned host buffer per (device, role) for every call of one thread, with the same
    bytes seen as a CUDA tensor: pinning per call costs more than the hand-off's copies, a
    buffer the GPU reads directly must outlive the read (a freed caching-allocator block
    does not), and making the CUDA view per call cost ~60 us. A buffer grows (doubling) to
    the largest product asked of it, so varying prompt lengths do not pin memory per length.

    Reuse is safe because each call waits for its device's stream to reach the call's own
    copy before it writes either buffer (or drops a smaller one), and every earlier read of
    them sits before that on the same stream."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, str], tuple[torch.Tensor, torch.Tensor | None]] = {}

    def get(
        self, device: torch.device, role: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pinned buffer as `shape`/`dtype`, the same bytes on `device` or None where
        the GPU cannot read host memory)."""
        nbytes = math.prod(shape) * dtype.itemsize
        got = self.buffers.get((device, role))
        if got is None or got[0].numel() < nbytes:
            size = max(nbytes, 2 * got[0].numel() if got is not None else 1)
            host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            got = (host, _device_view(host, device))
            self.buffers[(device, role)] = got
        host, dev = got
        mine = host[:nbytes].view(dtype).view(shape)
        return mine, None if dev is None else dev[:nbytes].view(dtype).view(shape)


_STAGING = _Staging()


class _ArrayInterface:
    """A pinned host byte buffer as a CUDA array (`__cuda_array_interface__`): with unified
    addressing a pinned buffer's host address is valid on the device, so kernels given the
    view read host memory over the link."""

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {
            "shape": (t.numel(),),
            "typestr": "|u1",
            "data": (t.data_ptr(), False),
            "version": 2,
            "strides": None,
        }


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """`host` (pinned bytes) as a tensor on `device` that aliases it, or None (warned)."""
    try:
        view = torch.as_tensor(_ArrayInterface(host), device=device)
    except (RuntimeError, TypeError, ValueError) as e:
        view = None
        reason = str(e)
    else:
        if view.data_ptr() == host.data_ptr():
            return view
        reason = "torch copied the buffer instead of aliasing it"
    warnings.warn(
        f"gpu_cpu_mm: the GPU cannot read pinned host memory here ({reason}); the CPU's "
        "rows come back by copy, behind any weights streaming on the copy engine",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def from_host(
    y_host: torch.Tensor, y_dev: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The pinned `y_host` on `device` in `dtype`: read by a kernel through `y_dev` (its
    alias there) rather than copied, so it does not queue behind streaming weights."""
    if y_dev is None:
        y = y_host.to(device, non_blocking=True)
        return y if y.dtype == dtype else y.to(dtype)
    # an elementwise kernel (a same-dtype copy_ would go to the copy engine's queue)
    return y_dev.to(dtype) if y_dev.dtype != dtype else y_dev.mul(1)


@torch.library.custom_op("hetero::gpu_cpu_mm", mutates_args=())
def gpu_cpu_mm(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    """(x @ w_gpu.T on x's device, x @ w_cpu.T computed on the host, back on x's device)."""
    if x.device.type != "cuda":
        # no GPU (tests, CPU-only machines): both shares here, same arithmetic per row
        y_cpu = x.to(w_cpu.dtype) @ w_cpu.t()
        return [x @ w_gpu.t(), y_cpu.to(x.dtype)]
    stream = torch.cuda.current_stream(x.device)
    x_host, _ = _STAGING.get(x.device, "x", tuple(x.shape), x.dtype)
    x_host.copy_(x, non_blocking=True)
    # A spinning wait: the thread that waits is the one that multiplies next, so it has
    # nothing better to do, and a blocking wait sleeps in the kernel for tens of
    # microseconds past the copy, four times per layer.
    ready = torch.cuda.Event()
    ready.record(stream)
    y_gpu = x @ w_gpu.t()  # queued behind the copy; runs while the CPU multiplies
    ready.synchronize()
    xc = x_host if x_host.dtype == w_cpu.dtype else x_host.to(w_cpu.dtype)
    y_host, y_dev = _STAGING.get(x.device, "y", (x.shape[0], w_cpu.shape[0]), w_cpu.dtype)
    torch.mm(xc, w_cpu.t(), out=y_host)
    return [y_gpu, from_host(y_host, y_dev, x.device, x.dtype)]


@gpu_cpu_mm.register_fake
def _(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], w_gpu.shape[0])), x.new_empty((x.shape[0], w_cpu.shape[0]))]
