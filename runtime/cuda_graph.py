"""Replay a stage as one CUDA graph: the host launches a whole decode step's kernels at once.

A one-token decode step is hundreds of small kernels; launched one by one from Python the
host, not the GPU, sets the pace. Captured once, a step is one `replay()`. What a graph
needs: every tensor it touches at a fixed address (the runner's weights and the KV cache
are: they live in the device's store for the whole generation; its activations are copied
into static input buffers) and fixed shapes (decode's are). Outputs are read back from the
graph's own buffers, so they are cloned before they leave.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from hetero.backends.gpu_cpu_mm import host_to_device

WARMUP = 3  # calls before capture: compiled code builds its kernels on the first ones


class CudaGraphRunner:
    """`fn(*acts)` captured as a CUDA graph on first use; later calls replay it."""

    def __init__(
        self, fn: Callable[..., tuple], device: torch.device, *, host_reads: bool = True
    ) -> None:
        self.fn = fn
        self.host_reads = host_reads
        self.device = device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: tuple = ()
        self.failed: BaseException | None = None

    def _capture(self, acts: Sequence[torch.Tensor]) -> None:
        self.static_in = [a.detach().to(self.device).clone() for a in acts]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side), torch.no_grad():
            for _ in range(WARMUP):
                self.fn(*self.static_in)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            self.static_out = tuple(self.fn(*self.static_in))
        self.graph = graph

    def __call__(self, *acts: torch.Tensor) -> tuple:
        if self.failed is not None:
            return tuple(self.fn(*acts))
        if self.graph is None or any(
            a.shape != s.shape or a.dtype != s.dtype
            for a, s in zip(acts, self.static_in, strict=True)
        ):
            try:
                self._capture(acts)
            except Exception as e:  # an op that cannot be captured: run it as it is
                self.failed = e
                self.graph = None
                return tuple(self.fn(*acts))
        for k, (s, a) in enumerate(zip(self.static_in, acts, strict=True)):
            if self.host_reads and a.device.type == "cpu":
                # a CPU stage's output: read by a kernel, not queued behind streaming weights
                host_to_device(a, self.device, f"graph{id(self)}:{k}", out=s)
            else:
                s.copy_(a, non_blocking=True)
        self.graph.replay()
        return tuple(o.clone() for o in self.static_out)
