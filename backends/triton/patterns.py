"""Fusion rules, tried in order; each returns a Match or None, and `Fallback` always matches.

Rules look at one node and the groups still open (see fusion.py); they never mutate state.
Order matters: attention (decode, then prefill) before rotary before matmuls (gated, then
plain) before RMSNorm before reductions before elementwise, so a node is taken by the most
specific kernel that can run it. The shapes the rules look for are in matchers.py.
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
from hetero.backends.triton.kernels.attention import Sdpa, sdpa
from hetero.backends.triton.kernels.ops import CASTS, POINTWISE, RESHAPES, TL_DTYPE
from hetero.backends.triton.matchers import (
    gated_pair,
    rms_start,
    rms_stat_of,
    rope_of,
    strip_views,
)

aten = torch.ops.aten
FLOATS = (torch.float16, torch.bfloat16, torch.float32)
NO_EPILOGUE = ("attention", "decode", "rotary")  # kernels that take no consumers along


def _arg(node: Node, i: int, name: str, default: object = None) -> object:
    if len(node.args) > i:
        return node.args[i]
    return node.kwargs.get(name, default)


SDPA = aten.scaled_dot_product_attention.default


def _attention(node: Node) -> Sdpa | None:
    """The node as an SDPA the attention kernels run, or None."""
    if node.target is not SDPA:
        return None
    q, k, v = node.args[:3]
    if not all(is_tensor(t) and len(shape(t)) == 4 for t in (q, k, v)):
        return None
    if float(_arg(node, 4, "dropout_p", 0.0)) != 0.0:
        return None
    if dtype(q) not in FLOATS or not (dtype(q) == dtype(k) == dtype(v)):
        return None
    (b, h, _, d), (bk, hk, n, dk), (bv, hv, nv, dv) = shape(q), shape(k), shape(v)
    if (b, hk) != (bk, hv) or bv != b or d != dk or d != dv or n != nv or d > 256:
        return None
    if h != hk and not (node.kwargs.get("enable_gqa") and hk and h % hk == 0):
        return None
    mask = _arg(node, 3, "attn_mask")
    if mask is not None and not (is_tensor(mask) and len(shape(mask)) <= 4):
        return None
    return sdpa(node)


class DecodeAttention:
    """SDPA with a few queries against many keys (one-token decode over a KV cache): the
    split-K kernel of kernels/decode.py, all query heads of a key/value head together."""

    name = "decode"
    MAX_ROWS = 64  # query rows per key/value head (queries x GQA group)

    def match(self, node: Node, st: FusionState) -> Match | None:
        a = _attention(node)
        if a is None or a.m * a.rep > self.MAX_ROWS or a.n < 8 * a.m:
            return None
        return Match(self.name, "decode", space=(a.b, a.h, a.m, a.n), close_now=True)


class Attention:
    """scaled_dot_product_attention as one flash-style kernel (causal, masks, grouped-query
    heads read in place)."""

    name = "attention"

    def match(self, node: Node, st: FusionState) -> Match | None:
        a = _attention(node)
        if a is None:
            return None
        return Match(self.name, "attention", space=(a.b, a.h, a.m, a.n), close_now=True)


class Rotary:
    """Rotary embeddings (x * cos + rotate_half(x) * sin) as one kernel; the query's and the
    key's, sharing cos and sin, share one launch."""

    name = "rotary"

    def match(self, node: Node, st: FusionState) -> Match | None:
        rope = rope_of(node)
        if rope is None:
            return None
        for g in st.open:
            if g.kind != "rotary":
                continue
            if any(n in g.nodes for n in rope.nodes):
                return Match(self.name, "rotary", join=g, space=g.space)
            first = rope_of(g.nodes[0])
            if (
                first is not None
                and (first.cos, first.sin) == (rope.cos, rope.sin)
                and node is rope.nodes[0]
                and dtype(first.out) == dtype(rope.out)
            ):
                return Match(self.name, "rotary", join=g, space=g.space)
        return Match(self.name, "rotary", space=(numel(rope.x),))


class GatedMatmul:
    """Two matmuls over the same A whose results one elementwise expression combines (the
    gate and up projections of a SwiGLU MLP): one kernel, two accumulators, one store."""

    name = "gated"

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.target is not aten.mm.default or dtype(node.args[0]) not in FLOATS:
            return None
        pair = gated_pair(node)
        if pair is None:
            return None
        first = pair[0]
        if node is first:
            return Match(self.name, "gated", space=(1, *shape(node)))
        g = st.member.get(first)
        if g is not None and g in st.open and g.kind == "gated":
            return Match(self.name, "gated", join=g, space=g.space)
        return None


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


class NormPrologue:
    """The RMSNorm statistic of an open matmul's A (its upcast, square, mean, eps, rsqrt):
    the matmul kernel accumulates the row's sum of squares from the A tiles it loads, so
    the norm costs no kernel and no memory traffic of its own (rewrite.norm_into_matmul
    puts a copy of the statistic after each matmul that reads a normalised row)."""

    name = "prologue"

    def match(self, node: Node, st: FusionState) -> Match | None:
        chain = rms_stat_of(node)
        if chain is None or chain.mul is not None:
            return None
        x = chain.x.args[0] if chain.x.target is aten._to_copy.default else chain.x
        users = list(chain.rsqrt.users)
        if len(shape(x)) != 2 or not all(u.target is aten.mul.Tensor for u in users):
            return None
        # the matmul whose rows it scales, already in an open group that reads the same A
        scaled = {a for u in users for a in u.args[:2] if a is not chain.rsqrt}
        for g in st.open:
            mms = [n for n in g.nodes if n.target is aten.mm.default]
            if g.kind not in ("matmul", "gated") or not mms or not scaled <= set(mms):
                continue
            a = g.nodes[0].args[0]
            if strip_views(a) is strip_views(x) and shape(a) == shape(x):
                return Match(self.name, g.kind, join=g, space=g.space)
        return None


class Conv:
    """A convolution (torch's, cuDNN on a GPU) with its bias and elementwise consumers
    (folded batch-norm, activation, residual add) as one Triton epilogue kernel."""

    name = "conv"

    def match(self, node: Node, st: FusionState) -> Match | None:
        if node.target is not aten.convolution.default or dtype(node) not in FLOATS:
            return None
        if not 3 <= len(shape(node)) <= 5 or numel(node) == 0:
            return None
        return Match(self.name, "conv", space=(numel(node),))


class RMSNorm:
    """The start of an RMSNorm chain (the upcast, or the pow) opens a row kernel of its own,
    or joins the elementwise/row kernel that produced its input (a residual add outside a
    matmul epilogue). Without this rule the upcast and the square would ride in the previous
    matmul's epilogue and go to memory in float32, to be read back by the reduction."""

    name = "rmsnorm"

    def match(self, node: Node, st: FusionState) -> Match | None:
        chain = rms_start(node)
        if chain is None:
            return None
        xs = shape(chain.x)
        cols = xs[-1]
        rows = numel(chain.x) // cols if cols else 0
        if cols <= 1 or rows == 0 or cols > 32768:
            return None
        space = (rows, cols)
        src = node.args[0]
        g = st.member.get(src) if isinstance(src, Node) else None
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
        if node.target in RESHAPES and all(_reads_itself(u) for u in node.users):
            return None  # its readers load it through strides: as a view it costs nothing
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


def _reads_itself(node: Node) -> bool:
    """A matmul (its A and B are read through strides) or an RMSNorm statistic that a
    matmul computes from its A tiles (NormPrologue)."""
    if node.target in Matmul.TARGETS:
        return True
    chain = rms_stat_of(node)
    return chain is not None and chain.mul is None


def _plain_copy(node: Node) -> bool:
    """_to_copy that only changes dtype (no device, layout or memory-format change)."""
    extra = set(node.kwargs) - {"dtype", "memory_format"}
    mf = node.kwargs.get("memory_format")
    return not extra and mf in (None, torch.preserve_format, torch.contiguous_format)


def _joinable(node: Node, g: OpenGroup, st: FusionState) -> bool:
    where = g.where(node)
    if where is None:
        return False
    if g.kind in NO_EPILOGUE:
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


RULES = (
    DecodeAttention(),
    Attention(),
    Rotary(),
    GatedMatmul(),
    Matmul(),
    NormPrologue(),
    Conv(),
    RMSNorm(),
    Reduction(),
    Elementwise(),
    Fallback(),
)

__all__ = [
    "RULES",
    "Attention",
    "Conv",
    "DecodeAttention",
    "Elementwise",
    "Fallback",
    "GatedMatmul",
    "Matmul",
    "NormPrologue",
    "RMSNorm",
    "Reduction",
    "Rotary",
    "val",
]
