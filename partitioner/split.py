"""Runnable partitions: cut the captured program into fx GraphModules, one per partition.

Built on torch.fx's `split_module`; this module only validates the assignment (every
node placed, no cycle between partitions), orders the partitions and records each
one's explicit inputs, parameters and outputs by the captured graph's value names.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch.fx import GraphModule
from torch.fx.passes.split_module import split_module
from torch.utils import _pytree as pytree

from hetero.errors import InvalidInput, PartitionError
from hetero.partitioner.graph import OpGraph


@dataclass(frozen=True)
class Partition:
    """One piece of the model: call `module(*[env[a] for a in arg_names])`."""

    index: int
    nodes: tuple[str, ...]  # op names of the captured graph it computes
    module: GraphModule
    arg_names: tuple[str, ...]  # the module's positional inputs, by captured value name
    params: tuple[str, ...]  # those of arg_names that are parameters/buffers/constants
    outputs: tuple[str, ...]  # the values it returns (a tuple, in this order)

    @property
    def inputs(self) -> tuple[str, ...]:
        """Activations and user inputs it needs from elsewhere (not parameters)."""
        ps = set(self.params)
        return tuple(a for a in self.arg_names if a not in ps)

    def __call__(self, env: Mapping[str, Any]) -> tuple:
        out = self.module(*[env[a] for a in self.arg_names])
        return tuple(out)


def check_assignment(graph: OpGraph, assignment: Mapping[str, int]) -> list[int]:
    """Raise PartitionError unless every op is placed and partitions form a DAG.

    Returns the partition ids in a topological order (ties broken by first op).
    """
    missing = [n for n in graph.order if n not in assignment]
    if missing:
        shown = ", ".join(missing[:10]) + (
            f" (+{len(missing) - 10} more)" if len(missing) > 10 else ""
        )
        raise PartitionError(
            f"{len(missing)} node(s) of {graph.model_name} have no partition: {shown}"
        )
    unknown = [n for n in assignment if n not in graph.nodes]
    if unknown:
        raise PartitionError(f"assignment names nodes not in the graph: {', '.join(unknown[:10])}")
    q = nx.DiGraph()
    first: dict[int, int] = {}
    for i, n in enumerate(graph.order):
        p = assignment[n]
        q.add_node(p)
        first.setdefault(p, i)
    witness: dict[tuple[int, int], tuple[str, str]] = {}
    for u, v in graph.graph.edges:
        pu, pv = assignment[u], assignment[v]
        if pu != pv:
            q.add_edge(pu, pv)
            witness.setdefault((pu, pv), (u, v))
    try:
        cycle = nx.find_cycle(q)
    except nx.NetworkXNoCycle:
        return list(nx.lexicographical_topological_sort(q, key=lambda p: first[p]))
    steps = []
    for pu, pv in cycle:
        u, v = witness[(pu, pv)]
        steps.append(f"node {u!r} (partition {pu}) feeds node {v!r} (partition {pv})")
    raise PartitionError(
        "the assignment makes partitions depend on each other in a cycle: "
        + "; ".join(steps)
        + ". Put these nodes in the same partition, or split along the graph's order."
    )


def split(graph: OpGraph, assignment: Mapping[str, int]) -> list[Partition]:
    """One runnable Partition per distinct id in `assignment`, in a topological order."""
    order = check_assignment(graph, assignment)
    rank = {p: i for i, p in enumerate(order)}
    gm = graph.program.graph_module
    node_part = {n: rank[p] for n, p in assignment.items()}

    def callback(node: torch.fx.Node) -> int:
        return node_part[node.name]

    top = _split_module(gm, callback)
    # Where does each value of the top-level graph come from: a placeholder or an output k of submod j.
    # Placeholders keep the original order, but fx renames ones that shadow builtins ("input").
    original = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    renamed = [n.name for n in top.graph.nodes if n.op == "placeholder"]
    produced: dict[str, str] = dict(zip(renamed, original, strict=True))
    parts: list[Partition] = []
    for node in top.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            src, k = node.args
            produced[node.name] = _output_names(getattr(top, src.target))[k]
        elif node.op == "call_module":
            sub: GraphModule = getattr(top, node.target)
            _ensure_tuple_output(sub)
            produced[node.name] = _output_names(sub)[0]  # used directly when it had one output
            arg_names = tuple(produced[a.name] for a in node.args)
            idx = int(node.target.rsplit("_", 1)[-1])
            ops = tuple(
                n.name for n in sub.graph.nodes if n.op == "call_function" and n.name in graph.nodes
            )
            parts.append(
                Partition(
                    index=idx,
                    nodes=ops,
                    module=sub,
                    arg_names=arg_names,
                    params=tuple(a for a in arg_names if a in graph.params),
                    outputs=_output_names(sub),
                )
            )
    parts.sort(key=lambda p: p.index)
    return parts


def _split_module(gm: GraphModule, callback) -> GraphModule:
    kwargs = {"keep_original_order": False, "keep_original_node_name": True}
    if "tuple_return" in inspect.signature(split_module).parameters:  # torch >= 2.12
        kwargs["tuple_return"] = True
    return split_module(gm, None, callback, **kwargs)


def _ensure_tuple_output(sub: GraphModule) -> None:
    """Make a submodule return a tuple even for one output (older split_module returns it bare)."""
    out = next(n for n in sub.graph.nodes if n.op == "output")
    if not isinstance(out.args[0], tuple | list):
        out.args = ((out.args[0],),)
        sub.recompile()


def _output_names(sub: GraphModule) -> tuple[str, ...]:
    out = next(n for n in sub.graph.nodes if n.op == "output")
    vals = out.args[0]
    if not isinstance(vals, tuple | list):
        vals = (vals,)
    return tuple(v.name for v in vals)


# ---- feeding and reading the captured program ------------------------------------------------


def param_values(graph: OpGraph) -> dict[str, torch.Tensor]:
    """Parameter/buffer/constant tensors by placeholder name."""
    ep = graph.program
    state = dict(ep.state_dict)
    state.update(ep.constants)
    return {name: state[fqn] for name, (fqn, _) in graph.params.items() if fqn in state}


def flatten_inputs(
    graph: OpGraph, args: Sequence[Any], kwargs: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """User inputs by placeholder name, in the order torch.export flattened them."""
    if not kwargs and all(isinstance(a, torch.Tensor) for a in args):
        flat = list(args)  # the common call: pytree's walk cost ~10 us a request
    else:
        flat, _ = pytree.tree_flatten((tuple(args), dict(kwargs or {})))
    names = list(graph.inputs)
    tensors = [x for x in flat if x is not None]
    if len(tensors) != len(names):
        raise InvalidInput(
            f"{graph.model_name} was captured with {len(names)} input tensor(s) ({', '.join(names)}); "
            f"got {len(tensors)}"
        )
    return dict(zip(names, tensors, strict=True))


def unflatten_outputs(graph: OpGraph, env: Mapping[str, Any]) -> Any:
    spec = graph.out_spec
    flat = [env[o] if o else None for o in graph.outputs]
    return pytree.tree_unflatten(flat, spec) if spec is not None else tuple(flat)


def run_partitions(graph: OpGraph, parts: Sequence[Partition], *args: Any, **kwargs: Any) -> Any:
    """Run partitions in order in this process; returns what the model returns."""
    return unflatten_outputs(graph, eager_values(graph, parts, *args, **kwargs))


def eager_values(
    graph: OpGraph, parts: Sequence[Partition], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """Every value the partitions exchange, from an eager run: examples for compiling each one."""
    env: dict[str, Any] = dict(param_values(graph))
    env.update(flatten_inputs(graph, args, kwargs))
    with torch.no_grad():
        for p in parts:
            env.update(zip(p.outputs, p(env), strict=True))
    return env
