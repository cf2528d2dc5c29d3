"""The compiled Ray graph of a fixed plan: one bound method call per stage, wired by the
values stages exchange, compiled once (`experimental_compile`) and executed per request.

Each stage's node reads the packets of the stages it needs (and the caller's packet,
for user inputs); every stage no other stage reads becomes an output, because a
compiled graph must end in all of its leaves.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hetero.runtime.stage import CALLER, StageSpec, producers, sources
from hetero.runtime.transfer import edge_transport, host_out


@dataclass
class CompiledPipeline:
    graph: Any  # ray.dag.CompiledDAG
    outputs: tuple[int, ...]  # stage index of each entry of a result, in order
    max_inflight: int = 1

    def execute(self, packet: Any) -> Any:
        return self.graph.execute(packet)


def build(
    stages: Sequence[StageSpec],
    workers: Mapping[str, Any],
    needed_outputs: Sequence[str],
    *,
    max_inflight: int = 1,
    submit_timeout_s: float = 10.0,
) -> CompiledPipeline:
    """Bind each stage to its device's worker (`workers[device name]`) and compile."""
    from ray.dag import InputNode, MultiOutputNode

    made_by = producers(stages)
    readers: dict[int, list[StageSpec]] = {s.index: [] for s in stages}
    for s in stages:
        for src in sources(s, made_by):
            if src != CALLER:
                readers[src].append(s)
    wanted = {made_by[v] for v in needed_outputs if v in made_by}
    leaves = [s.index for s in stages if s.index in wanted or not readers[s.index]]
    nodes: dict[int, Any] = {}
    with InputNode() as inp:
        for s in stages:
            srcs = sources(s, made_by) or (CALLER,)
            args = [inp if src == CALLER else nodes[src] for src in srcs]
            to_host = host_out(s, readers[s.index], to_caller=s.index in leaves)
            node = workers[s.device.name].run.bind(s.index, to_host, *args)
            transport = edge_transport(s, readers[s.index], to_caller=s.index in leaves)
            if transport is not None:
                node = node.with_tensor_transport(transport=transport)
            nodes[s.index] = node
        dag = MultiOutputNode([nodes[i] for i in leaves])
    compiled = dag.experimental_compile(
        _submit_timeout=submit_timeout_s, _max_inflight_executions=max(1, max_inflight)
    )
    return CompiledPipeline(compiled, tuple(leaves), max(1, max_inflight))
