"""A partition's program computing in another dtype than the model's: a host CPU's layers
in bfloat16 (or float32) copies of a float16 model's weights (partitioner/host_dtype.py says
when and why).

The program's 16-bit float work moves to `dtype`: every dtype the graph names (a norm's
cast back from float32, a factory op's dtype) that is float16 or bfloat16 becomes `dtype`,
its 16-bit activations are cast on the way in and its outputs back to their own dtype on the
way out, so its neighbours see the model's dtype. Its weights and state (a KV cache) are
bound in `dtype` by the runtime (`host_tensor`): the state is updated in place there and
never leaves the device in another dtype than it was made in (a cache moved between phases
is converted by the copy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch.fx import GraphModule, Node
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileUnit
from hetero.partitioner import host_dtype

SIXTEEN_BIT = tuple(getattr(torch, d) for d in host_dtype.SIXTEEN_BIT)
_CAST = torch.ops.aten._to_copy.default


def bound_dtype(own: torch.dtype, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a retyped program binds a tensor of dtype `own` in: `dtype` for 16-bit
    floats (where given), `own` otherwise."""
    return dtype if dtype is not None and own in SIXTEEN_BIT else own


def host_tensor(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """`t` as a retyped program binds it: its 16-bit floats in `dtype`, the rest as is."""
    want = bound_dtype(t.dtype, dtype)
    return t if want == t.dtype else t.to(want)


def retype_unit(unit: CompileUnit, dtype: torch.dtype) -> CompileUnit:
    """`unit` computing its 16-bit work in `dtype`, its params as the runtime binds them."""
    return dataclasses.replace(
        unit,
        module=retype_program(unit.module, unit.example_inputs, dtype),
        param_values={k: host_tensor(v, dtype) for k, v in unit.param_values.items()},
    )


def retype_program(
    module: GraphModule, inputs: Sequence[torch.Tensor | object], dtype: torch.dtype
) -> GraphModule:
    """`module` (placeholders: the activations `inputs`, then its params) computing its
    16-bit float work in `dtype`; a new module, `module` is left as it was."""
    gm = GraphModule(module, _copy_graph(module.graph))
    graph = gm.graph
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    out_node = next(n for n in graph.nodes if n.op == "output")
    own = {id(n): _dtype_of(n) for n in graph.nodes}

    for node in graph.nodes:
        if node.op == "call_function":
            node.args = pytree.tree_map_only(torch.dtype, lambda d: _swap(d, dtype), node.args)
            node.kwargs = pytree.tree_map_only(torch.dtype, lambda d: _swap(d, dtype), node.kwargs)
    cast_of: dict[Node, Node] = {}
    for node, example in zip(placeholders, inputs, strict=False):
        if isinstance(example, torch.Tensor) and example.dtype in SIXTEEN_BIT:
            cast_of[_cast_uses(graph, node, dtype)] = node

    def back(value):
        if isinstance(value, Node) and value in cast_of:
            return cast_of[value]  # an input passed straight through, untouched
        if isinstance(value, Node) and own.get(id(value)) in SIXTEEN_BIT:
            with graph.inserting_before(out_node):
                return graph.call_function(_CAST, (value,), {"dtype": own[id(value)]})
        return value

    out_node.args = pytree.tree_map_only(Node, back, out_node.args)
    for cast in cast_of:
        if not cast.users:
            graph.erase_node(cast)
    graph.lint()
    gm.recompile()
    return gm


def _swap(d: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    return dtype if d in SIXTEEN_BIT else d


def _dtype_of(node: Node) -> torch.dtype | None:
    val = node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


def _cast_uses(graph: torch.fx.Graph, node: Node, dtype: torch.dtype) -> Node:
    users = list(node.users)
    with graph.inserting_after(node):
        cast = graph.call_function(_CAST, (node,), {"dtype": dtype})
    for user in users:
        user.replace_input_with(node, cast)
    return cast


def _copy_graph(graph: torch.fx.Graph) -> torch.fx.Graph:
    new = torch.fx.Graph()
    out = new.graph_copy(graph, {})
    new.output(out)
    return new
