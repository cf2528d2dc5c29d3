"""The compiled Ray graph of a fixed plan: one bound method call per stage, wired by the
values stages exchange, compiled once (`experimental_compile`) and executed per request.

Each stage's node reads the packets of the stages it needs (and the caller's packet,
for user inputs); every stage no other stage reads becomes an output, because a
compiled graph must end in all of its leaves.

A GPU stage whose readers are all GPU stages sends its packet with
`with_tensor_transport("nccl")` (runtime/transfer.py): the tensors go GPU to GPU over NCCL,
the rest of the packet (names, timings) over shared memory. Ray builds that channel only
for readers in other actors; readers in the stage's own worker (streamed pieces of one
partition) take the packet inside the process, so such an edge keeps Ray's default.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetero.runtime.stage import CALLER, StageSpec, producers, sources
from hetero.runtime.transfer import edge_transport, host_out

NCCL, SHM = "nccl", "shm"


@dataclass(frozen=True)
class Wiring:
    """Who reads each stage's packet and how it travels; no Ray needed to compute it."""

    readers: Mapping[int, tuple[StageSpec, ...]]  # stage index -> stages reading its packet
    leaves: tuple[int, ...]  # stages whose packets go to the caller, in stage order
    host_out: Mapping[int, bool]  # stage index -> copy its outputs to host memory first
    # stage index -> "nccl" (GPU to GPU) or "shm" (Ray's default channel: shared memory on
    # a node, the object store across nodes; always for packets to the caller)
    transports: Mapping[int, str]


def wiring(stages: Sequence[StageSpec], needed_outputs: Sequence[str]) -> Wiring:
    made_by = producers(stages)
    readers: dict[int, list[StageSpec]] = {s.index: [] for s in stages}
    for s in stages:
        for src in sources(s, made_by):
            if src != CALLER:
                readers[src].append(s)
    wanted = {made_by[v] for v in needed_outputs if v in made_by}
    leaves = tuple(s.index for s in stages if s.index in wanted or not readers[s.index])
    to_host, transports = {}, {}
    for s in stages:
        mine, to_caller = readers[s.index], s.index in leaves
        to_host[s.index] = host_out(s, mine, to_caller=to_caller)
        transport = edge_transport(s, mine, to_caller=to_caller)
        if all(r.device.name == s.device.name for r in mine):
            transport = None  # Ray asserts an accelerator channel has a reader elsewhere
        transports[s.index] = transport or SHM
    return Wiring({i: tuple(r) for i, r in readers.items()}, leaves, to_host, transports)


@dataclass
class CompiledPipeline:
    graph: Any  # ray.dag.CompiledDAG
    outputs: tuple[int, ...]  # stage index of each entry of a result, in order
    max_inflight: int = 1
    transports: Mapping[int, str] = field(default_factory=dict)  # as in Wiring

    def execute(self, packet: Any) -> Any:
        return self.graph.execute(packet)


def send(node: Any, transport: str) -> Any:
    """`node` (a bound Ray DAG node) with its result sent over `transport`: NCCL (GPU to
    GPU) or SHM (Ray's default channel)."""
    return node.with_tensor_transport(transport=NCCL) if transport == NCCL else node


def compile_dag(dag: Any, *, max_inflight: int = 1, submit_timeout_s: float = 10.0) -> Any:
    """A bound Ray DAG compiled the way hetero runs its plans: at most `max_inflight`
    executions in it at once, a submission waiting at most `submit_timeout_s`."""
    return dag.experimental_compile(
        _submit_timeout=submit_timeout_s, _max_inflight_executions=max(1, max_inflight)
    )


def pipelined(
    execute: Callable[[Any], Any], items: Iterable[Any], max_inflight: int
) -> Iterator[tuple[int, Any]]:
    """Submit `items` to a compiled graph (`execute`) keeping at most `max_inflight` in it;
    yields (index, reference), oldest first, whenever the caller must take a result (the
    caller gets it before asking for the next, which frees the slot)."""
    inflight: deque[tuple[int, Any]] = deque()
    for i, item in enumerate(items):
        if len(inflight) >= max(1, max_inflight):
            yield inflight.popleft()
        inflight.append((i, execute(item)))
    while inflight:
        yield inflight.popleft()


def build(
    stages: Sequence[StageSpec],
    workers: Mapping[str, Any],
    needed_outputs: Sequence[str],
    *,
    max_inflight: int = 1,
    submit_timeout_s: float = 10.0,
) -> CompiledPipeline:
    """Bind each stage to its device's worker (`workers[device name]`) and compile."""
    from ray.dag import InputNode, MultiOutputNode  # optional (hetero[ray]): loaded on first use

    made_by = producers(stages)
    wired = wiring(stages, needed_outputs)
    nodes: dict[int, Any] = {}
    with InputNode() as inp:
        for s in stages:
            srcs = sources(s, made_by) or (CALLER,)
            args = [inp if src == CALLER else nodes[src] for src in srcs]
            node = workers[s.device.name].run.bind(s.index, wired.host_out[s.index], *args)
            nodes[s.index] = send(node, wired.transports[s.index])
        dag = MultiOutputNode([nodes[i] for i in wired.leaves])
    compiled = compile_dag(dag, max_inflight=max_inflight, submit_timeout_s=submit_timeout_s)
    return CompiledPipeline(compiled, wired.leaves, max(1, max_inflight), wired.transports)
