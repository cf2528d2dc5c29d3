"""A module captured and rewritten by `split_program`, with its inputs bound: the preamble the
split-program tests share."""

from __future__ import annotations

import torch

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm
from hetero.partitioner.graph import capture
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


def split_calls(gm: torch.fx.GraphModule) -> list:
    """The split ops a program calls, in order."""
    return [n.target for n in gm.graph.nodes if n.target in (gpu_cpu_mm, gpu_cpu_mlp)]
