"""A small block (Linear, GELU, residual, LayerNorm) captured as one partition's unit: what
the inductor and export tests compile."""

from __future__ import annotations

import torch

from hetero.backends.base import CompileUnit
from hetero.partitioner.graph import capture
from hetero.partitioner.split import flatten_inputs, param_values, split


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.ln = torch.nn.LayerNorm(16)

    def forward(self, x):
        return self.ln(torch.nn.functional.gelu(self.lin(x)) + x)


def unit_of(model: torch.nn.Module, x: torch.Tensor) -> CompileUnit:
    """`model` on `x` captured whole as one partition's unit."""
    graph = capture(model.eval(), (x,))
    (part,) = split(graph, {n: 0 for n in graph.order})
    return CompileUnit.from_partition(part, flatten_inputs(graph, (x,)), param_values(graph))
