"""`hetero::gpu_cpu_mm`: one matmul computed by a GPU and its host CPU at once, each on its
share of the weight's rows (the `split` placement, partitioner/gpu_cpu_split.py).

A custom op rather than Python in a graph: a compiler sees one opaque call with known output
shapes and fuses the rest of the program around it; torch.export records it as one node.
Importing this module registers the op.
"""

from __future__ import annotations

import torch


@torch.library.custom_op("hetero::gpu_cpu_mm", mutates_args=())
def gpu_cpu_mm(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    """(x @ w_gpu.T on x's device, x @ w_cpu.T computed on the host, back on x's device)."""
    if x.device.type != "cuda":
        # no GPU (tests, CPU-only machines): both shares here, same arithmetic per row
        y_cpu = x.to(w_cpu.dtype) @ w_cpu.t()
        return [x @ w_gpu.t(), y_cpu.to(x.dtype)]
    stream = torch.cuda.current_stream(x.device)
    x_host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
    x_host.copy_(x, non_blocking=True)
    # A spinning wait: the thread that waits is the one that multiplies next, so it has
    # nothing better to do, and a blocking wait sleeps in the kernel for tens of
    # microseconds past the copy, four times per layer.
    ready = torch.cuda.Event()
    ready.record(stream)
    y_gpu = x @ w_gpu.t()  # queued behind the copy; runs while the CPU multiplies
    ready.synchronize()
    xc = x_host if x_host.dtype == w_cpu.dtype else x_host.to(w_cpu.dtype)
    y_host = torch.empty((x.shape[0], w_cpu.shape[0]), dtype=w_cpu.dtype, pin_memory=True)
    torch.mm(xc, w_cpu.t(), out=y_host)
    y_cpu = y_host.to(x.device, non_blocking=True)
    return [y_gpu, y_cpu if y_cpu.dtype == x.dtype else y_cpu.to(x.dtype)]


@gpu_cpu_mm.register_fake
def _(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], w_gpu.shape[0])), x.new_empty((x.shape[0], w_cpu.shape[0]))]
