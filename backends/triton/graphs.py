"""Replay a partition's whole launch sequence as one CUDA graph when shapes are static.

The first call for an input signature warms the program up on the stream the capture runs
on (Triton compiles, the allocator settles, cuBLAS makes its workspace), then captures one
call; later calls copy the inputs into the captured buffers and replay. Outputs live in the
graph's memory pool, so they are cloned unless the caller promises to consume them before
the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

Signature = tuple[tuple[tuple[int, ...], torch.dtype], ...]


def capture(
    fn: Callable[..., Any],
    args: Sequence[Any],
    *,
    warmup: int,
    device: torch.device | None = None,
    pool: Any = None,
) -> tuple[torch.cuda.CUDAGraph, tuple]:
    """(the graph of `fn(*args)`, its outputs' static buffers), after `warmup` calls on the
    stream it captures on (compiled code builds its kernels on its first calls, which a graph
    cannot hold). `device`: None for the current one; `pool`: a memory pool shared with other
    graphs that never run at once (torch.cuda.graph_pool_handle())."""
    graph = torch.cuda.CUDAGraph()
    ctx = torch.cuda.graph(graph, pool=pool)
    # Warm up on the stream the capture runs on, torch's one capture stream, not a new side
    # stream per capture: cuBLAS keeps a workspace per (handle, stream) for the process's
    # life, 32 MiB on Hopper, made by the stream's first product. A side stream per graph
    # left 32 MiB behind per capture, up to the 32 pooled streams: 0.3-0.9 GiB past a capped
    # 7B's plan (BENCHMARKS.md runs 41-42; pytorch/pytorch#99196).
    side = ctx.capture_stream
    want = torch.device(device if device is not None else "cuda")
    if want.index is None:
        want = torch.device("cuda", torch.cuda.current_device())
    if side.device != want:  # that stream lives on another GPU
        side = torch.cuda.Stream(want)
        ctx = torch.cuda.graph(graph, pool=pool, stream=side)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side), torch.no_grad():
        for _ in range(warmup):
            fn(*args)
    torch.cuda.current_stream(device).wait_stream(side)
    rng = torch.cuda.default_generators[torch.device(device or "cuda").index or 0]
    before = rng.clone_state()
    try:
        with ctx, torch.no_grad():
            out = tuple(fn(*args))
    except BaseException:
        # A capture an op invalidated can end without the generator's epilogue: it then goes
        # on believing itself captured, and the process's next random draw on the GPU raises
        # "Offset increment outside graph capture" (what a GPU test's process did once a
        # split stage, whose hand-offs wait on the host, had been captured: BENCHMARKS.md run
        # 39). Callers fall back to running uncaptured; the generator gets a copy of its
        # state from before the capture.
        rng.graphsafe_set_state(before)
        raise
    return graph, out


class GraphRunner:
    def __init__(self, fn: Callable[..., tuple[torch.Tensor, ...]], clone_outputs: bool = True,
                 warmup: int = 2) -> None:  # fmt: skip
        self.fn = fn
        self.clone_outputs = clone_outputs
        self.warmup = warmup
        self._graphs: dict[Signature, tuple[torch.cuda.CUDAGraph, list, tuple]] = {}

    def _capture(self, acts: tuple[torch.Tensor, ...]):
        static = [a.clone() for a in acts]
        graph, outs = capture(self.fn, static, warmup=self.warmup)
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


def replay_or_run(
    run: Callable[..., tuple[torch.Tensor, ...]], dev: torch.device, clone_outputs: bool = True
) -> Callable[..., tuple[torch.Tensor, ...]]:
    """`run` (on CUDA device `dev`) captured as a CUDA graph on its first call per input
    signature and replayed after (`GraphRunner`); from the first call that cannot be
    captured on (a host sync, a host tensor copied in: transformers' Mixtral routing), `run`
    itself. A run made by this already is handed back as it is: a capture inside another's
    fails, and both would run uncaptured."""
    if getattr(run, "replays", False):
        return run
    graphs = GraphRunner(run, clone_outputs=clone_outputs)
    failed: list[BaseException] = []

    def replay(*acts: Any) -> tuple[torch.Tensor, ...]:
        if failed or not all(isinstance(a, torch.Tensor) for a in acts):
            return run(*acts)
        try:
            with torch.cuda.device(dev):
                return graphs(*[a.to(dev) for a in acts])
        except Exception as e:  # not capturable: uncaptured from now on
            failed.append(e)
            torch.cuda.synchronize(dev)
            return run(*acts)

    replay.replays = True  # type: ignore[attr-defined]
    return replay
