"""A module captured and rewritten by `split_program`, with its inputs bound: the preamble the
split-program tests share."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping

import torch

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm
from hetero.partitioner.gpu_cpu_split import split_matmuls
from hetero.partitioner.graph import OpGraph, capture
from hetero.partitioner.split import param_values
from hetero.runtime.split_linear import SharedMatmuls, shares, split_program


def split_module(
    module: torch.nn.Module, x: torch.Tensor, fraction: float, cpu_dtype=None
) -> tuple[torch.fx.GraphModule, tuple[torch.Tensor, ...], tuple[SharedMatmuls, ...]]:
    """(the rewritten program, its arguments: weights, shares and `x`, its split groups)."""
    graph = capture(module, (x,))
    gm = graph.program.graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params = {name: graph.program.state_dict[fqn] for name, (fqn, _) in graph.params.items()}
    shapes = {n: tuple(params[n].shape) for n in names if n in params and params[n].dim() == 2}
    split, inputs, groups = split_program(gm, names, fraction, shapes)
    gpu, cpu = shares(params, groups, cpu_dtype)
    values = {**params, **gpu, **cpu, names[-1]: x}
    return split, tuple(values[n] for n in inputs), groups


def split_graph(
    graph: OpGraph, fraction: float
) -> tuple[
    torch.fx.GraphModule,
    Callable[[Mapping[str, torch.Tensor]], tuple[torch.Tensor, ...]],
    tuple[SharedMatmuls, ...],
]:
    """A captured graph's program rewritten with every matmul the planner can split
    (`split_matmuls`) split at `fraction`: (the program, a function from its user inputs and
    state by placeholder name to all its arguments, its split groups)."""
    mms = split_matmuls(graph, list(graph.nodes))
    gm = copy.deepcopy(graph.program.graph_module)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    split, inputs, groups = split_program(
        gm, names, fraction, {m.weight: (m.rows, m.cols) for m in mms}
    )
    params = param_values(graph)
    gpu, cpu = shares(params, groups)

    def bind(values: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        bound = {**params, **gpu, **cpu, **values}
        return tuple(bound[n] for n in inputs)

    return split, bind, groups


def split_calls(gm: torch.fx.GraphModule) -> list:
    """The split ops a program calls, in order."""
    return [n.target for n in gm.graph.nodes if n.target in (gpu_cpu_mm, gpu_cpu_mlp)]
