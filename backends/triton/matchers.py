"""What the layers of modern models look like in core ATen, as pure functions over fx nodes.

The rules in patterns.py ask these whether a node belongs to one of the shapes below; each
returns a description of the match or None, and never looks at fusion state.

  RMSNorm   [x = _to_copy(r, float32)]; pow(x, 2); mean(-1, keepdim); add(eps); rsqrt;
            [mul(x, rsqrt)]  — then usually a cast back and a multiply by the weight
  rotary    add(mul(x, cos), mul(cat([neg(x[..., h:]), x[..., :h]], -1), sin))
            (transformers' apply_rotary_pos_emb with rotate_half, as LLaMA, Qwen2 and
            Mistral export it)
  gated     two mm with the same A whose results meet in one elementwise expression
            (SwiGLU: silu(x @ Wg) * (x @ Wu); GeGLU with gelu)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import dtype, is_tensor, shape
from hetero.backends.triton.kernels.ops import CASTS, POINTWISE, RESHAPES

aten = torch.ops.aten
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_BIG = 2**62


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _call(node: object, *targets: object) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


# ---- RMSNorm ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RmsChain:
    """x -> rsqrt(mean(x^2, -1) + eps) [-> x * rsqrt]; `nodes` in graph order, x excluded;
    `mul` the normalising multiply (None where only the statistic is computed)."""

    x: Node
    nodes: tuple[Node, ...]
    eps: float
    mul: Node | None

    @property
    def rsqrt(self) -> Node:
        return self.nodes[3]


def rms_chain(x: Node) -> RmsChain | None:
    if not is_tensor(x) or dtype(x) not in FLOATS or len(shape(x)) == 0:
        return None
    rank = len(shape(x))
    for p in x.users:
        if not (_call(p, aten.pow.Tensor_Scalar) and p.args[1] in (2, 2.0)):
            continue
        mean = _only_user(p)
        if not (_call(mean, aten.mean.dim) and len(mean.args) > 2 and mean.args[2]):
            continue
        dims = mean.args[1]
        if len(dims) != 1 or dims[0] % rank != rank - 1 or mean.kwargs.get("dtype") is not None:
            continue
        add = _only_user(mean)
        if not (_call(add, aten.add.Tensor, aten.add.Scalar) and add.args[0] is mean):
            continue
        eps = add.args[1]
        if not isinstance(eps, float | int) or add.kwargs.get("alpha", 1) != 1:
            continue
        r = _only_user(add)
        if not _call(r, aten.rsqrt.default):
            continue
        mul = _only_user(r)
        if not (_call(mul, aten.mul.Tensor) and set(mul.args) == {x, r}):
            return RmsChain(x, (p, mean, add, r), float(eps), None)
        return RmsChain(x, (p, mean, add, r, mul), float(eps), mul)
    return None


def rms_stat_of(node: Node) -> RmsChain | None:
    """The chain `node` is part of: the upcast, pow, mean, add or rsqrt (at most 4 uses
    before the rsqrt)."""
    x = node
    for _ in range(5):
        if not isinstance(x, Node):
            return None
        chain = rms_chain(x)
        if chain is not None and (node is x or node in chain.nodes[:4]):
            if node is x and not _call(x, aten._to_copy.default):
                return None  # x itself is the chain's input, not part of it
            return chain
        x = x.args[0] if x.op == "call_function" and x.args else None
    return None


def rms_start(node: Node) -> RmsChain | None:
    """The chain that `node` starts: an upcast whose result is normalised, or the pow of a
    value that is not such an upcast."""
    if _call(node, aten._to_copy.default):
        return rms_chain(node)
    if _call(node, aten.pow.Tensor_Scalar):
        x = node.args[0]
        if isinstance(x, Node) and not _call(x, aten._to_copy.default):
            chain = rms_chain(x)
            if chain is not None and chain.nodes[0] is node:
                return chain
    return None


# ---- rotary embeddings ------------------------------------------------------------------------


@dataclass(frozen=True)
class Rope:
    """out = x * cos + rotate_half(x) * sin over x's last dim; `nodes` in graph order."""

    x: Node
    cos: Node
    sin: Node
    out: Node
    nodes: tuple[Node, ...]


def _other(mul: Node, x: object) -> object:
    a, b = mul.args[:2]
    return b if a is x else (a if b is x else None)


def _slice(node: object, x: Node, dim: int, start: int, end: int) -> bool:
    if not _call(node, aten.slice.Tensor) or node.args[0] is not x:
        return False
    rank = len(shape(x))
    defaults = (0, None, None, 1)  # dim, start, end, step
    d, s, e, step = (*node.args[1:], *defaults[len(node.args) - 1 :])
    s = 0 if s is None else s
    e = _BIG if e is None else e
    return d % rank == dim and s == start and min(e, shape(x)[dim]) == end and step == 1


def rope_at(add: Node) -> Rope | None:
    if not _call(add, aten.add.Tensor) or add.kwargs.get("alpha", 1) != 1:
        return None
    for m1, m2 in (add.args[:2], add.args[1::-1]):
        if not (_call(m1, aten.mul.Tensor) and _call(m2, aten.mul.Tensor)):
            continue
        cat = next((a for a in m2.args[:2] if _call(a, aten.cat.default)), None)
        if cat is None or len(cat.args[0]) != 2:
            continue
        neg, lo = cat.args[0]
        if not _call(neg, aten.neg.default):
            continue
        hi = neg.args[0]
        x = hi.args[0] if _call(hi, aten.slice.Tensor) else None
        if not is_tensor(x) or dtype(x) not in FLOATS or len(shape(x)) < 2:
            continue
        rank, d = len(shape(x)), shape(x)[-1]
        half = d // 2
        cat_dim = cat.args[1] if len(cat.args) > 1 else 0
        if d % 2 or cat_dim % rank != rank - 1:
            continue
        if not (_slice(hi, x, rank - 1, half, d) and _slice(lo, x, rank - 1, 0, half)):
            continue
        cos, sin = _other(m1, x), _other(m2, cat)
        if not (is_tensor(cos) and is_tensor(sin)) or cos is x or sin is x:
            continue
        inner = (m1, hi, lo, neg, cat, m2)
        if any(len(n.users) != 1 for n in inner):
            continue
        if not shape(m1) == shape(m2) == shape(add) == shape(x):
            continue  # cos/sin broadcast to x, never the other way
        if dtype(cos) not in FLOATS or dtype(sin) not in FLOATS:
            continue
        order = {n: i for i, n in enumerate(add.graph.nodes)}
        nodes = tuple(sorted((*inner, add), key=order.__getitem__))
        return Rope(x, cos, sin, add, nodes)
    return None


_ROPE_OPS = (aten.mul.Tensor, aten.slice.Tensor, aten.neg.default, aten.cat.default,
             aten.add.Tensor)  # fmt: skip


def rope_of(node: Node) -> Rope | None:
    """The rotary pattern `node` is part of (its final add is at most 4 uses away)."""
    if not _call(node, *_ROPE_OPS):
        return None
    frontier, seen = [node], set()
    for _ in range(5):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if n.target is aten.add.Tensor:
                r = rope_at(n)
                if r is not None and node in r.nodes:
                    return r
            nxt.extend(u for u in n.users if _call(u, *_ROPE_OPS))
        frontier = nxt
    return None


# ---- gated MLPs -------------------------------------------------------------------------------


def _elementwise(node: object) -> bool:
    return _call(node, *POINTWISE, *CASTS, *RESHAPES)


def strip_views(node: object) -> object:
    while _call(node, *RESHAPES):
        node = node.args[0]
    return node


def _back_to_mm(node: object, depth: int = 10) -> Node | None:
    """The one mm that the elementwise expression ending in `node` reads (silu(x) is
    x * sigmoid(x): two inputs, one source); other leaves (weights, constants) may be read."""
    found: set[Node] = set()
    frontier, seen = [node], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            if _call(n, aten.mm.default):
                found.add(n)
            elif _elementwise(n):
                nxt.extend(a for a in n.all_input_nodes if is_tensor(a))
            elif _call(n, aten.addmm.default, aten.bmm.default):
                return None  # another matmul feeds the expression
        frontier = nxt
    return next(iter(found)) if len(found) == 1 and not frontier else None


def gated_pair(mm: Node) -> tuple[Node, Node] | None:
    """(first, second) in graph order: mm and another mm over the same A (and B of the same
    shape and dtype) whose results one elementwise expression combines."""
    if not _call(mm, aten.mm.default):
        return None
    a_root, b = strip_views(mm.args[0]), mm.args[1]
    frontier, seen = [mm], set()
    for _ in range(8):
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            for other in n.all_input_nodes:
                if other in seen or n is mm:
                    continue
                o = _back_to_mm(other)
                if (
                    o is not None
                    and o is not mm
                    and strip_views(o.args[0]) is a_root
                    and shape(o.args[0]) == shape(mm.args[0])
                    and shape(o.args[1]) == shape(b)
                    and dtype(o.args[1]) == dtype(b)
                    and shape(o) == shape(mm)
                ):
                    order = {x: i for i, x in enumerate(mm.graph.nodes)}
                    first, second = sorted((mm, o), key=order.__getitem__)
                    return first, second
            nxt.extend(u for u in n.users if _elementwise(u))
        frontier = nxt
    return None


__all__ = [
    "RmsChain",
    "Rope",
    "gated_pair",
    "rms_chain",
    "rms_start",
    "rms_stat_of",
    "rope_at",
    "rope_of",
    "strip_views",
]
