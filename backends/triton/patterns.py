"""Fusion rules, tried in order; each returns a Match or None, and `Fallback` always matches.

Rules look at one node and the groups still open (see fusion.py); they never mutate state.
Order matters: attention before matmul before reductions before elementwise, so a node is
taken by the most specific kernel that can run it.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import (
    FusionState,
    Match,
    OpenGroup,
    dtype,
    getitem_of,
    is_tensor,
    numel,
    shape,
    val,
)
from hetero.backends.triton.kernels.ops import CASTS, POINTWISE, RESHAPES, TL_DTYPE

aten = torch.ops.aten
FLOATS = (torch.float16, torch.bfloat16, torch.float32)


def _arg(node: Node, i: int, name: str, default: object = None) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


class Attention:
    """scaled_dot_product_attention as one flash-style kernel (causal and mask supported)."""

    name = "attention"

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.target is not aten.scaled_dot_product_attention.default:
            return None
        q, k, v = node.args[:3]
        if not all(is_tensor(t) and len(shape(t)) == 4 for t in (q, k, v)):
            return None
        if float(_arg(node, 4, "dropout_p", 0.0)) != 0.0 or node.kwargs.get("enable_gqa"):
            return None
        if dtype(q) not in FLOATS or not (dtype(q) == dtype(k) == dtype(v)):
            return None
        (b, h, m, d), (bk, hk, n, dk), (_, _, nv, dv) = shape(q), shape(k), shape(v)
        if (b, h) != (bk, hk) or d != dk or d != dv or n != nv or d > 256:
            return None
        mask = _arg(node, 3, "attn_mask")
        if mask is not None and not (is_tensor(mask) and len(shape(mask)) <= 4):
            return None
        return Match(self.name, "attention", space=(b, h, m, n), close_now=True)


class Matmul:
    """mm / addmm / bmm; elementwise consumers join as its epilogue (see Elementwise)."""

    name = "matmul"
    TARGETS = (aten.mm.default, aten.addmm.default, aten.bmm.default)

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.target not in self.TARGETS:
            return None
        a, b = (node.args[1], node.args[2]) if node.target is aten.addmm.default else node.args[:2]
        if dtype(a) not in FLOATS or dtype(a) != dtype(b):
            return None
        if node.target is aten.addmm.default and not is_tensor(node.args[0]):
            return None
        s = shape(node)
        space = (1, *s) if len(s) == 2 else s
        return Match(self.name, "matmul", space=space)


class Reduction:
    """Reductions over the last dim: sum/mean/amax/amin, softmax, log-softmax, LayerNorm.

    RMSNorm and decomposed softmax/LayerNorm are chains of these and elementwise ops, so
    they fuse into one row kernel without a pattern of their own.
    """

    name = "reduction"
    TARGETS = (
        aten.sum.dim_IntList,
        aten.mean.dim,
        aten.amax.default,
        aten.amin.default,
        aten._softmax.default,
        aten._log_softmax.default,
        aten.native_layer_norm.default,
    )

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.target not in self.TARGETS:
            return None
        x = node.args[0]
        if not is_tensor(x) or dtype(x) not in FLOATS or len(shape(x)) == 0:
            return None
        xs = shape(x)
        last = len(xs) - 1
        if node.target is aten.native_layer_norm.default:
            if len(node.args[1]) != 1:
                return None
        elif node.target in (aten._softmax.default, aten._log_softmax.default):
            if node.args[1] % len(xs) != last:
                return None
        else:
            dims = _arg(node, 1, "dim")
            if dims is None or len(dims) != 1 or dims[0] % len(xs) != last:
                return None
            if node.kwargs.get("dtype") is not None:
                return None
        cols = xs[-1]
        rows = numel(x) // cols if cols else 0
        if cols <= 1 or rows == 0 or cols > 32768:
            return None
        space = (rows, cols)
        g = st.member.get(x)
        joins = (
            g is not None
            and g in st.open
            and (
                (g.kind == "pointwise" and g.numel == rows * cols)
                or (g.kind == "rowwise" and g.space == space)
            )
        )
        if joins:
            return Match(self.name, "rowwise", join=g, space=space)
        return Match(self.name, "rowwise", space=space)


class Elementwise:
    """Pointwise ops, casts and reshapes: join a group that produced an input, or start one."""

    name = "elementwise"

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.op != "call_function":
            return None
        gi = getitem_of(node)
        if gi is not None:
            g = st.member.get(gi[0]) if isinstance(gi[0], Node) else None
            if g is not None and g in st.open:
                return Match(g.rule, g.kind, join=g, space=g.space)
            return None
        pointwise = node.target in POINTWISE or node.target is aten._to_copy.default
        passthrough = node.target in CASTS or node.target in RESHAPES
        if not (pointwise or passthrough) or not is_tensor(node):
            return None
        if dtype(node) not in TL_DTYPE or numel(node) == 0:
            return None
        if node.target is aten._to_copy.default and not _plain_copy(node):
            return None
        ins = [a for a in node.all_input_nodes if is_tensor(a)]
        if any(dtype(a) not in TL_DTYPE for a in ins) or not ins:
            return None
        if node.target in RESHAPES and len(ins) != 1:
            return None
        read = st.groups_read_by(node)
        for g in read:
            if _joinable(node, g, st):
                return Match(g.rule, g.kind, join=g, space=g.space)
        if not pointwise:
            return None
        if not read:  # a new root: share an open kernel over the same elements (horizontal)
            for g in reversed(st.open):
                if g.kind == "pointwise" and g.numel == numel(node):
                    return Match(g.rule, g.kind, join=g, space=g.space)
        return Match(self.name, "pointwise", space=(numel(node),))


def _plain_copy(node: Node) -> bool:
    """_to_copy that only changes dtype (no device, layout or memory-format change)."""
    extra = set(node.kwargs) - {"dtype", "memory_format"}
    mf = node.kwargs.get("memory_format")
    return not extra and mf in (None, torch.preserve_format, torch.contiguous_format)


def _joinable(node: Node, g: OpenGroup, st: FusionState) -> bool:
    where = g.where(node)
    if where is None:
        return False
    if g.kind == "attention":
        return False
    for a in node.all_input_nodes:
        if st.member.get(a) is not g:
            continue
        wa = g.where(a) if is_tensor(a) else None
        if wa is None:
            return False
        if wa == "full" and where == "row":
            return False
        if wa == "row" and where == "full":
            # a per-row value broadcast along the row: keepdim shape (..., 1)
            sa, sn = shape(a), shape(node)
            if node.target in RESHAPES or list(sa) != [*sn[:-1], 1][-len(sa) :]:
                return False
    return True


class Fallback:
    """Everything else runs as its ATen call inside the same compiled program."""

    name = "aten"

    def match(self, node: Node, st: FusionState) -> Match | None:
        return Match(self.name, "aten")


RULES = (Attention(), Matmul(), Reduction(), Elementwise(), Fallback())

__all__ = ["RULES", "Attention", "Elementwise", "Fallback", "Matmul", "Reduction", "val"]
