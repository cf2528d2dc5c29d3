"""Replay a partition's whole launch sequence as one CUDA graph when shapes are static.

The first call for an input signature warms the program up on a side stream (Triton
compiles, the allocator settles), then captures one call; later calls copy the inputs
into the captured buffers and replay. Outputs live in the graph's memory pool, so they are
cloned unless the caller promises to consume them before the next call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


class GraphRunner:
    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], clone_outputs: bool = True,
                 warmup: int = 2) -> None:  # fmt: skip
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self._graphs: dict[Signature, tuple[torch.cuda.CUDAGraph, list, tuple]] = {}

    def _capture(self, acts: tuple[torch.Tensor, ...]):
        static = [a.clone() for a in acts]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                self.fn(*static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outs = self.fn(*static)
        return graph, static, outs

    def __call__(self, *acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        sig = tuple((tuple(a.shape), a.dtype) for a in acts)
        if sig not in self._graphs:
            self._graphs[sig] = self._capture(acts)
        graph, static, outs = self._graphs[sig]
        for s, a in zip(static, acts, strict=True):
            s.copy_(a, non_blocking=True)
        graph.replay()
        if self.clone_outputs:
            return tuple(o.clone() for o in outs)
        return outs
