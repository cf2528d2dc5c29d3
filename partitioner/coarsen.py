"""Coarsen an OpGraph into groups of ops by module (nn_module_stack), refinable on demand.

A group is a maximal run of consecutive ops (in the export's topological order) that
share an enclosing module at the chosen depth. Runs of a topological order always
form an acyclic quotient graph, so any assignment of groups to devices that follows
the group order yields runnable partitions.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import networkx as nx

if TYPE_CHECKING:  # graph.py builds groups through this module (OpGraph.coarsen)
    from hetero.partitioner.graph import OpGraph


@dataclass(frozen=True)
class Group:
    """Ops that the partitioner places together."""

    name: str  # module path with a run suffix when a module is split, e.g. "h.3.mlp"
    nodes: tuple[str, ...]
    module: str
    depth: int
    flops: int
    bytes_in: int  # bytes read from outside the group (activations, user inputs, parameters)
    bytes_out: int  # bytes written that leave the group
    param_bytes: int  # weights (state excluded)
    params: tuple[str, ...]  # weight placeholders it reads (state excluded)
    launches: int
    op_classes: tuple[tuple[str, int], ...]  # (class, count), most common first
    dtype: str  # dtype of most of its outputs
    act_bytes: int  # peak bytes of activations live while one of its ops runs (live_bytes)
    state: tuple[str, ...] = ()  # buffers it updates in place (a layer's KV cache)
    state_bytes: int = 0  # held on the device that runs the group, whatever its weights do

    @property
    def fused_bytes(self) -> int:
        """Bytes a fused implementation moves: only what crosses the group's boundary."""
        return self.bytes_in + self.bytes_out


class GroupGraph:
    """Groups in topological order, as a networkx DiGraph with edge bytes."""

    def __init__(self, opgraph: OpGraph, groups: tuple[Group, ...]) -> None:
        self.opgraph = opgraph
        self.groups = groups
        self.index = {g.name: i for i, g in enumerate(groups)}
        self.group_of = {n: g.name for g in groups for n in g.nodes}
        gg = nx.DiGraph()
        for g in groups:
            gg.add_node(g.name, group=g)
        for u, v, data in opgraph.graph.edges(data=True):
            gu, gv = self.group_of[u], self.group_of[v]
            if gu != gv:
                prev = gg.edges[gu, gv]["bytes"] if gg.has_edge(gu, gv) else 0
                gg.add_edge(gu, gv, bytes=prev + data["bytes"])
        self.graph = gg

    def __len__(self) -> int:
        return len(self.groups)

    def __iter__(self):
        return iter(self.groups)

    def __getitem__(self, name: str) -> Group:
        return self.groups[self.index[name]]

    def input_bytes(self, name: str) -> int:
        """Bytes of user inputs the group reads (they arrive from the caller's host)."""
        g = self[name]
        og = self.opgraph
        seen = {v for n in g.nodes for v in og[n].inputs if v in og.inputs}
        return sum(og.inputs[v].nbytes for v in seen)

    def output_bytes(self, name: str) -> int:
        """Bytes of model outputs the group produces (they return to the caller)."""
        g = self[name]
        return sum(self.opgraph.value_bytes(o) for o in self.opgraph.outputs if o in set(g.nodes))

    def refine(self, name: str) -> GroupGraph:
        """Split one group one module level deeper (a no-op at the deepest level)."""
        target = self[name]
        pieces = _runs(self.opgraph, target.nodes, target.depth + 1)
        if len(pieces) <= 1:
            return self
        live = live_bytes(self.opgraph)
        new = []
        for g in self.groups:
            if g.name == name:
                new.extend(
                    _make_group(self.opgraph, key, nodes, target.depth + 1, live)
                    for key, nodes in pieces
                )
            else:
                new.append(g)
        return GroupGraph(self.opgraph, _unique_names(new))

    def assignment(self, group_to_part: dict[str, int]) -> dict[str, int]:
        """Lift a group -> partition map to an op -> partition map."""
        return {n: group_to_part[g.name] for g in self.groups for n in g.nodes}


def coarsen(opgraph: OpGraph, depth: int | None = None, max_groups: int = 64) -> GroupGraph:
    """Group ops by module at `depth`; by default the deepest depth with ≤ max_groups groups."""
    if depth is None:
        max_depth = max((len(n.module_stack) for n in opgraph), default=0)
        depth = 0
        for d in range(1, max_depth + 1):
            if len(_runs(opgraph, opgraph.order, d)) <= max_groups:
                depth = d
            else:
                break
    pieces = _runs(opgraph, opgraph.order, depth)
    live = live_bytes(opgraph)
    groups = [_make_group(opgraph, key, nodes, depth, live) for key, nodes in pieces]
    return GroupGraph(opgraph, _unique_names(groups))


def _runs(opgraph: OpGraph, order, depth: int) -> list[tuple[str, tuple[str, ...]]]:
    runs: list[tuple[str, list[str]]] = []
    for name in order:
        key = opgraph[name].module_at(depth) or "(root)"
        if runs and runs[-1][0] == key:
            runs[-1][1].append(name)
        else:
            runs.append((key, [name]))
    return [(k, tuple(v)) for k, v in runs]


def _unique_names(groups: list[Group]) -> tuple[Group, ...]:
    counts = Counter(g.name for g in groups)
    seen: Counter = Counter()
    out = []
    for g in groups:
        if counts[g.name] > 1:
            seen[g.name] += 1
            g = Group(**{**g.__dict__, "name": f"{g.name}#{seen[g.name]}"})
        out.append(g)
    return tuple(out)


def live_bytes(opgraph: OpGraph) -> dict[str, int]:
    """Op name -> bytes of activations live while it runs, by a liveness walk over the
    topological order (one request, ops run one at a time, nothing freed early).

    A value is live from its producer to its last reader; model outputs stay live to the
    end (the caller takes them), user inputs from the start. Views allocate nothing but
    keep their base alive (so a view read late holds the whole base), and a view of a
    parameter is weights, not an activation. A multi-output op's results count together
    until the last of them is read. Parameters are counted elsewhere (resident or stream
    slots). The walk is global: it also counts values produced by other groups (the
    residual stream, rotary tables, masks) that are still needed later, which are what a
    group's partition holds across its boundaries when its neighbours share the device.
    A fused attention kernel (SDPA) materialises no score matrix, so it adds nothing
    beyond its inputs and output; unfused attention appears as explicit ops and is counted.
    """
    order = opgraph.order
    end = len(order)
    root: dict[str, str | None] = {v: v for v in opgraph.inputs}
    size: dict[str, int] = {v: m.nbytes for v, m in opgraph.inputs.items()}
    born: dict[str, int] = dict.fromkeys(opgraph.inputs, 0)
    last: dict[str, int] = dict.fromkeys(opgraph.inputs, -1)
    for i, name in enumerate(order):
        op = opgraph[name]
        for v in op.inputs:
            r = root.get(v)
            if r is not None:
                last[r] = max(last[r], i)
        if op.op_class == "view":
            # the base is the first value read (a weight's view reads none: not an activation)
            root[name] = root.get(op.inputs[0]) if op.inputs else None
        else:
            root[name] = name
            size[name] = sum(m.nbytes for m in op.out_meta if m.is_tensor)
            born[name] = i
            last[name] = i  # a result nobody reads is freed right after its op
    for out in opgraph.outputs:
        r = root.get(out)
        if r is not None:
            last[r] = end
    # +size at birth, -size after the last read: a running sum is the live set per op
    delta = [0] * (end + 2)
    for r, b in size.items():
        delta[born[r]] += b
        delta[max(last[r], born[r]) + 1] -= b
    out: dict[str, int] = {}
    live = 0
    for i, name in enumerate(order):
        live += delta[i]
        out[name] = live
    return out


def _make_group(
    opgraph: OpGraph,
    module: str,
    nodes: tuple[str, ...],
    depth: int,
    live: dict[str, int] | None = None,
) -> Group:
    inside = set(nodes)
    ops = [opgraph[n] for n in nodes]
    read = tuple(dict.fromkeys(p for op in ops for p in op.params))
    params = tuple(p for p in read if p not in opgraph.state)
    state = tuple(p for p in read if p in opgraph.state)
    reads_outside = {v for op in ops for v in op.inputs if v not in inside}
    bytes_in = sum(opgraph.value_bytes(v) for v in reads_outside) + sum(
        opgraph.params[p][1] for p in params
    )
    outputs = set(opgraph.outputs)
    leaving = {
        n
        for n in nodes
        if n in outputs or any(s not in inside for s in opgraph.graph.successors(n))
    }
    bytes_out = sum(opgraph.value_bytes(n) for n in leaving)
    classes = Counter(op.op_class for op in ops if op.op_class != "view")
    dtypes = Counter(op.dtype for op in ops if op.op_class != "view")
    live = live_bytes(opgraph) if live is None else live
    act = max((live[n] for n in nodes), default=0)
    return Group(
        name=module,
        nodes=nodes,
        module=module,
        depth=depth,
        flops=sum(op.flops for op in ops),
        bytes_in=bytes_in,
        bytes_out=bytes_out,
        param_bytes=sum(opgraph.params[p][1] for p in params),
        params=params,
        launches=sum(op.launches for op in ops),
        op_classes=tuple(classes.most_common()),
        dtype=dtypes.most_common(1)[0][0] if dtypes else "float32",
        act_bytes=act,
        state=state,
        state_bytes=sum(opgraph.params[p][1] for p in state),
    )
