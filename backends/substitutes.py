"""Library operators hetero runs through its own: a partition's call of one is rewritten to
call hetero's equivalent before any backend compiles it.

A library may define an operator as a host loop (transformers' `grouped_mm_fallback` reads
its experts' bounds with `tolist()`): every backend then runs that loop, waits for the GPU
at each call of it, and cannot capture the program in a CUDA graph. hetero's equivalent
computes the same values on the device (backends/grouped_mm.py). The captured graph keeps
the library's operator (the planner prices it, the eager run computes the reference values
every candidate is checked against); only the partition a backend compiles calls hetero's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping

import torch

from hetero.backends import grouped_mm  # noqa: F401  (registers hetero::grouped_mm)

# the library operator's qualified name -> hetero's operator taking the same arguments
SUBSTITUTES: Mapping[str, torch._ops.OpOverload] = {
    "transformers::grouped_mm_fallback": torch.ops.hetero.grouped_mm.default,
}


def substituted(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """`gm` with each call of a library operator in SUBSTITUTES calling hetero's instead (a
    copy: `gm` is the partition's own); `gm` itself where it calls none."""
    if not any(_substitute(n) for n in gm.graph.nodes):
        return gm
    graph = copy.deepcopy(gm.graph)
    for node in graph.nodes:
        ours = _substitute(node)
        if ours is None:
            continue
        names = [a.name for a in node.target._schema.arguments]
        args = list(node.args) + [node.kwargs[n] for n in names[len(node.args) :]]
        node.target, node.args, node.kwargs = ours, tuple(args), {}
    return torch.fx.GraphModule(gm, graph)


def _substitute(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    schema = getattr(node.target, "_schema", None) if node.op == "call_function" else None
    return SUBSTITUTES.get(schema.name) if schema is not None else None
