"""Replay a stage as one CUDA graph: the host launches a whole decode step's kernels at once.

A one-token decode step is hundreds of small kernels; launched one by one from Python the
host, not the GPU, sets the pace. Captured once, a step is one `replay()`. What a graph
needs: every tensor it touches at a fixed address (the runner's weights and the KV cache
are: they live in the device's store for the whole generation; its activations are copied
into static input buffers) and fixed shapes (decode's are). Outputs are read back from the
graph's own buffers, so they are cloned before they leave.

A streamed stage's weights are not at one address: they arrive in one of the weight
streamer's two slots. `SlotGraphs` captures such a stage once per set of parameter
addresses (at most one graph per slot), waits for its slot's copy as the stream already
does, and replays the graph of the slot its weights are in. All graphs of one binder share
one memory pool (they run one after another and their outputs are cloned at once): a pool
per graph would round each layer's few intermediates up to allocator segments.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from hetero.backends.gpu_cpu_mm import host_to_device
from hetero.backends.triton.graphs import capture

_HOST = torch.device("cpu")
WARMUP = 3  # calls before capture: compiled code builds its kernels on the first ones


class CudaGraphRunner:
    """`fn(*acts)` captured as a CUDA graph on first use; later calls replay it."""

    def __init__(
        self,
        fn: Callable[..., tuple],
        device: torch.device,
        *,
        host_reads: bool = True,
        pool: Any = None,
    ) -> None:
        self.fn = fn
        self.host_reads = host_reads
        self.device = device
        self.pool = pool
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_in: list[torch.Tensor] = []
        self.static_out: tuple = ()
        self.failed: BaseException | None = None

    def _capture(self, acts: Sequence[torch.Tensor]) -> None:
        self.static_in = [a.detach().to(self.device).clone() for a in acts]
        self.graph, self.static_out = capture(
            self.fn, self.static_in, warmup=WARMUP, device=self.device, pool=self.pool
        )

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


class SlotGraphs:
    """`fn(*acts, *params)` captured once per set of parameter addresses, replayed after:
    a streamed stage, whose weights sit in one of the streamer's slots. `acts` are copied
    into the graph's own buffers by a kernel (a same-device copy could wait in the copy
    engine's queue behind streaming weights); a host act (a CPU stage's output) is read by
    that kernel straight from pinned memory (`reads_host`: the bound runner hands host
    tensors over as they are, one kernel per act instead of an upload and then a copy);
    outputs are cloned out."""

    reads_host = True

    def __init__(
        self,
        fn: Callable[..., tuple],
        device: torch.device,
        acts: int,
        *,
        pool: Any = None,
        limit: int = 2,
    ) -> None:
        self.fn = fn
        self.device = device
        self.acts = acts
        self.pool = pool
        self.limit = limit  # graphs per stage: one per slot its weights may land in
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, list[torch.Tensor], tuple]] = {}
        self.failed: BaseException | None = None

    def _key(self, args: Sequence[Any]) -> tuple:
        acts, params = args[: self.acts], args[self.acts :]
        return (
            tuple((tuple(a.shape), a.dtype) if isinstance(a, torch.Tensor) else a for a in acts),
            tuple(p.data_ptr() if isinstance(p, torch.Tensor) else p for p in params),
        )

    def _role(self, k: int) -> str:
        return f"slot{id(self)}:{k}"

    def _uncaptured(self, args: Sequence[Any]) -> tuple:
        acts = [
            host_to_device(a, self.device, self._role(k))
            if isinstance(a, torch.Tensor) and a.device.type == "cpu"
            else a
            for k, a in enumerate(args[: self.acts])
        ]
        return tuple(self.fn(*acts, *args[self.acts :]))

    def __call__(self, *args: Any) -> tuple:
        if self.failed is not None or not all(
            isinstance(a, torch.Tensor) and a.device in (self.device, _HOST)
            for a in args[: self.acts]
        ):
            return self._uncaptured(args)
        key = self._key(args)
        got = self.graphs.get(key)
        if got is None:
            if len(self.graphs) >= self.limit:  # weights somewhere new every call: uncaptured
                return self._uncaptured(args)
            static = [a.detach().to(self.device).clone() for a in args[: self.acts]]
            try:
                graph, out = capture(
                    self.fn,
                    [*static, *args[self.acts :]],
                    warmup=WARMUP,
                    device=self.device,
                    pool=self.pool,
                )
            except Exception as e:  # an op that cannot be captured: run it as it is
                self.failed = e
                return self._uncaptured(args)
            got = self.graphs[key] = (graph, static, out)
        graph, static, out = got
        for k, (s, a) in enumerate(zip(static, args[: self.acts], strict=True)):
            if a.device.type == "cpu":
                host_to_device(a, self.device, self._role(k), out=s)
            else:
                _kernel_copy(s, a)
        graph.replay()
        return tuple(o.clone() for o in out)


def _kernel_copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    if src.dtype == torch.bool:
        dst.copy_(src, non_blocking=True)
    else:
        torch.mul(src, 1, out=dst)
