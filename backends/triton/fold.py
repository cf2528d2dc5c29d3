"""Compile-time work on weights: fold what depends only on parameters, and lay weights out.

A partition often transposes a weight (`permute(w, [1, 0])` before `mm`), builds masks and
position ids from `arange`/`full`, or casts parameters. None of that depends on the
activations, so it runs once here; the results become the partition's weights, stored
contiguous so that every kernel reads them in the layout it reads fastest (a transposed
weight is stored pre-transposed).
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

aten = torch.ops.aten

# Folding these would turn a small tensor into a big one; they fold only while small.
_NO_FOLD_GROWTH = {aten.expand.default, aten.repeat.default}
_SMALL = 4 << 20  # bytes
_RANDOM = {aten.rand.default, aten.randn.default, aten.bernoulli.p, aten.native_dropout.default}


@dataclass(frozen=True)
class Folded:
    """The partition after folding: activations first, then weights (all contiguous)."""

    module: GraphModule
    inputs: tuple[str, ...]
    weights: tuple[tuple[str, torch.Tensor], ...]


def fold_weights(
    gm: GraphModule,
    inputs: tuple[str, ...],
    params: Mapping[str, torch.Tensor],
    dtype: torch.dtype | None = None,
) -> Folded:
    """Evaluate every node whose inputs are all parameters or constants; keep the rest.

    `gm`'s placeholders are `inputs` then the parameters, in `params`' order.
    """
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    known: dict[Node, object] = {}
    for ph in phs[len(inputs) :]:
        t = params[ph.name].detach()
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        known[ph] = t
    tuples: dict[Node, tuple] = {}  # folded multi-output ops, only ever read by getitem
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in _RANDOM:
            continue
        if node.target is operator.getitem and node.args[0] in tuples:
            known[node] = tuples[node.args[0]][node.args[1]]
            continue
        if not all(a in known for a in node.all_input_nodes):
            continue
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs), lambda a: known[a])
        val = node.target(*args, **kwargs)
        if isinstance(val, tuple | list):
            if all(u.target is operator.getitem for u in node.users):
                tuples[node] = tuple(val)
            continue
        if not isinstance(val, torch.Tensor):
            continue
        grows = val.numel() > 2 * sum(known[a].numel() for a in node.all_input_nodes)
        if node.target in _NO_FOLD_GROWTH and grows and val.nbytes > _SMALL:
            continue
        known[node] = val
    overrides = {n: a for n in gm.graph.nodes if (a := _constant_mask_args(n, known))}

    graph = Graph()
    env: dict[Node, Node] = {}
    for ph in phs[: len(inputs)]:
        env[ph] = graph.placeholder(ph.name)
        env[ph].meta = dict(ph.meta)
    # A folded value becomes a weight where an unfolded node (or the output) reads it.
    needed: dict[Node, None] = {}
    for node in gm.graph.nodes:
        if node in known or node in tuples or node.op == "placeholder":
            continue
        reads = node.all_input_nodes
        if node in overrides:
            reads = _nodes_in(overrides[node])
        for a in reads:
            if a in known:
                needed[a] = None
    weights: list[tuple[str, torch.Tensor]] = []
    for n in needed:
        name = n.name if n.op == "placeholder" else f"w_{n.name}"
        env[n] = graph.placeholder(name)
        env[n].meta = {"val": known[n]}
        weights.append((name, known[n].contiguous()))
    for node in gm.graph.nodes:
        if node.op == "placeholder" or node in env or node in known or node in tuples:
            continue
        if node in overrides:
            args, kwargs = torch.fx.node.map_arg(overrides[node], lambda a: env[a])
            new = graph.call_function(node.target, args, kwargs)
            new.name, new.meta = node.name, dict(node.meta)
        else:
            new = graph.node_copy(node, lambda a: env[a])
        env[node] = new
    out = GraphModule(gm, graph)
    out.graph.eliminate_dead_code()
    out.recompile()
    return Folded(out, inputs, tuple(weights))


def _nodes_in(args_kwargs: tuple) -> list[Node]:
    found: list[Node] = []
    torch.fx.node.map_arg(args_kwargs, found.append)
    return found


def _constant_mask_args(node: Node, known: Mapping[Node, object]) -> tuple | None:
    """New (args, kwargs) for an attention whose constant mask is causal or keeps everything.

    A mask built from positions alone (GPT-2's causal mask without padding) is a constant
    after folding; as `is_causal` (or no mask) the kernel skips the blocks above the
    diagonal and reads no mask at all.
    """
    if node.op != "call_function" or node.target is not aten.scaled_dot_product_attention.default:
        return None
    names = ("attn_mask", "dropout_p", "is_causal")
    pos = dict(zip(names, node.args[3:6], strict=False))
    opts = {**{k: v for k, v in node.kwargs.items() if k in names}, **pos}
    mask = opts.get("attn_mask")
    if not isinstance(mask, Node) or mask not in known or opts.get("is_causal"):
        return None
    m = known[mask]
    q, k = (a.meta.get("val") for a in node.args[:2])
    if not isinstance(m, torch.Tensor) or q is None or k is None:
        return None
    rows, cols = int(q.shape[-2]), int(k.shape[-2])
    try:
        mc = m.detach().cpu().expand(*m.shape[:-2], rows, cols)
    except RuntimeError:  # not broadcastable to (rows, cols): leave the node alone
        return None
    tri = torch.ones(rows, cols, dtype=torch.bool).tril()
    if mc.dtype == torch.bool:
        keep_all, causal = bool(mc.all()), bool((mc == tri).all())
    elif mc.is_floating_point():
        keep_all = bool((mc == 0).all())
        causal = bool(((mc == 0) == tri).all() and (mc[..., ~tri] == float("-inf")).all())
    else:
        return None
    if not (keep_all or causal):
        return None
    kwargs = {k: v for k, v in node.kwargs.items() if k not in names}
    kwargs["dropout_p"] = opts.get("dropout_p", 0.0)
    kwargs["is_causal"] = causal and not keep_all
    return tuple(node.args[:3]), kwargs
