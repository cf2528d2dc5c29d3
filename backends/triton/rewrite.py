"""ATen-to-ATen rewrites that run between weight folding and fusion.

Each rewrite keeps the graph's meaning (the result is still core ATen that eager runs) and
exposes a cheaper form to the fusion rules:

  gqa_without_copies   SDPA over `repeat_kv(k)`, `repeat_kv(v)` (unsqueeze, expand, clone,
                       view: a copy of every key and value per query head) reads the grouped
                       keys directly with `enable_gqa=True`; the copies become dead code.
  fold_batch_norm      inference batch-norm after a convolution folds into the convolution's
                       weight and bias; one elsewhere becomes a per-channel multiply-add that
                       fuses with its neighbours.
  norm_into_matmul     an RMSNorm read only by matmuls becomes their prologue: its weight
                       folds into theirs and its 1/rms scales their rows (see PROLOGUE_ROWS).

They need meta['val'] (shapes); the backend runs them on the folded graph and folds again,
so the new weight arithmetic (batch-norm scales) runs once at compile time.
"""

from __future__ import annotations

import operator
from collections.abc import Callable

import torch
from torch.fx import GraphModule, Node

from hetero.backends.triton.fusion import dtype, numel, shape, val
from hetero.backends.triton.matchers import RmsChain, rms_chain

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
_MATMULS = (aten.mm.default, aten.addmm.default)
_VIEWS = (aten.view.default, aten._unsafe_view.default, aten.reshape.default)


def _peel(node: object) -> object:
    """Skip ops that change nothing: aliases, full-range slices, same-shape views."""
    while isinstance(node, Node) and node.op == "call_function":
        src = node.args[0] if node.args else None
        if not isinstance(src, Node):
            return node
        same = (
            node.target is aten.alias.default
            or (node.target is aten.slice.Tensor and _full_slice(node))
            or (node.target in _VIEWS and shape(node) == shape(src) and shape(node))
        )
        if not same:
            return node
        node = src
    return node


def _full_slice(node: Node) -> bool:
    src, dim = node.args[0], node.args[1] if len(node.args) > 1 else 0
    start = node.args[2] if len(node.args) > 2 else None
    end = node.args[3] if len(node.args) > 3 else None
    step = node.args[4] if len(node.args) > 4 else 1
    size = shape(src)[dim] if shape(src) else None
    return (
        size is not None
        and start in (None, 0)
        and (end is None or (isinstance(end, int) and end >= size))
        and step == 1
    )


def repeated_kv(node: object) -> tuple[Node, int] | None:
    """(grouped tensor, repeats) if `node` is transformers' repeat_kv of a (B, Hk, S, D) value:
    view(clone(expand(unsqueeze(x, 2), [B, Hk, R, S, D])), [B, Hk * R, S, D])."""
    v = _peel(node)
    if not (isinstance(v, Node) and v.target in _VIEWS and len(shape(v)) == 4):
        return None
    c = _peel(v.args[0])
    if isinstance(c, Node) and c.target is aten.clone.default:
        c = _peel(c.args[0])
    if not (isinstance(c, Node) and c.target is aten.expand.default):
        return None
    u = _peel(c.args[0])
    if not (isinstance(u, Node) and u.target is aten.unsqueeze.default and u.args[1] in (2, -3)):
        return None
    src = u.args[0]
    if not isinstance(src, Node) or len(shape(src)) != 4:
        return None
    b, hk, s, d = shape(src)
    e = shape(c)
    if len(e) != 5 or (e[0], e[1], e[3], e[4]) != (b, hk, s, d):
        return None
    if shape(v) != (b, hk * e[2], s, d):
        return None
    return src, e[2]


def gqa_without_copies(gm: GraphModule) -> bool:
    changed = False
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not SDPA or node.kwargs.get("enable_gqa"):
            continue
        q, k, v = node.args[:3]
        rk, rv = repeated_kv(k), repeated_kv(v)
        if rk is None or rv is None or rk[1] != rv[1] or rk[1] < 2:
            continue
        if len(shape(q)) != 4 or shape(q)[1] != shape(rk[0])[1] * rk[1]:
            continue
        node.args = (q, rk[0], rv[0], *node.args[3:])
        node.kwargs = {**node.kwargs, "enable_gqa": True}
        changed = True
    return changed


BN = aten._native_batch_norm_legit_no_training.default
CONV = aten.convolution.default


def fold_batch_norm(gm: GraphModule) -> bool:
    """getitem(batch_norm(x, w, b, mean, var, _, eps), 0) -> conv with folded weights, or
    x * scale + shift with per-channel scale = w / sqrt(var + eps), shift = b - mean * scale."""
    changed = False
    g = gm.graph
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not BN:
            continue
        users = list(node.users)
        if not users or any(u.target is not operator.getitem or u.args[1] != 0 for u in users):
            continue
        x, w, b, mean, var = node.args[:5]
        eps = float(node.args[6])
        ndim = len(shape(x))
        if ndim < 2 or not all(isinstance(t, Node) for t in (mean, var)):
            continue
        chan = [-1] + [1] * (ndim - 2)
        conv = x if _folds_into(x) else None
        with g.inserting_before(conv if conv is not None else node):
            scale = g.call_function(
                aten.rsqrt.default, (g.call_function(aten.add.Tensor, (var, eps)),)
            )
            if w is not None:
                scale = g.call_function(aten.mul.Tensor, (scale, w))
            shift = g.call_function(aten.mul.Tensor, (mean, scale))
            shift = g.call_function(aten.neg.default, (shift,))
            if b is not None:
                shift = g.call_function(aten.add.Tensor, (shift, b))
            if conv is not None:
                cw, cb = conv.args[1], conv.args[2]
                wshape = [-1] + [1] * (len(shape(cw)) - 1)
                new_w = g.call_function(
                    aten.mul.Tensor, (cw, g.call_function(aten.view.default, (scale, wshape)))
                )
                new_b = shift
                if cb is not None:
                    new_b = g.call_function(
                        aten.add.Tensor, (g.call_function(aten.mul.Tensor, (cb, scale)), shift)
                    )
                conv.args = (conv.args[0], new_w, new_b, *conv.args[3:])
                out = conv
            else:
                sv = g.call_function(aten.view.default, (scale, chan))
                tv = g.call_function(aten.view.default, (shift, chan))
                out = g.call_function(
                    aten.add.Tensor, (g.call_function(aten.mul.Tensor, (x, sv)), tv)
                )
        for u in users:
            u.replace_all_uses_with(out)
            g.erase_node(u)
        g.erase_node(node)
        changed = True
    return changed


def _folds_into(x: object) -> bool:
    """A convolution whose only reader is this batch-norm, with constant-foldable weights."""
    return (
        isinstance(x, Node)
        and x.target is CONV
        and len(x.users) == 1
        and not x.args[6]  # not transposed: its weight's first dim is the output channel
        and isinstance(val(x.args[1]), torch.Tensor)
    )


# Up to this many rows (decode, small batches) each matmul after an RMSNorm computes the
# norm's statistic itself from the A tiles it loads anyway, and the norm kernel disappears;
# with more rows (prefill) the sum of squares would compete with the tensor cores, so one
# row kernel computes the statistic for all of them and writes only that.
PROLOGUE_ROWS = 64


def norm_into_matmul(gm: GraphModule) -> bool:
    """mm(w * cast(x * rsqrt(mean(x^2) + eps)), W) -> cast(mm(x, w[:, None] * W) * rsqrt(...)).

    The normalised activations are never written: the norm's weight folds into each reading
    matmul's weight (at compile time) and the per-row 1/rms scales the matmul's epilogue.
    Only where every reader of the norm's output is a matmul's A operand (view included).
    """
    changed = False
    g = gm.graph
    for x in list(g.nodes):
        chain = rms_chain(x) if x.op in ("call_function", "placeholder") else None
        if chain is None or chain.mul is None:
            continue
        out = _norm_output(chain)
        if out is None:
            continue
        y, w = out
        readers = _matmul_readers(y)
        src = x.args[0] if x.target is aten._to_copy.default else x
        if not readers or dtype(src) != dtype(y):
            continue
        k = shape(y)[-1]
        rows = numel(y) // k
        in_loop = rows <= PROLOGUE_ROWS
        shared = None
        if not in_loop:
            with g.inserting_after(chain.rsqrt):
                shared = g.call_function(aten.view.default, (chain.rsqrt, [rows, 1]))
        for mm in readers:
            bias = mm.args[0] if mm.target is aten.addmm.default else None
            with g.inserting_before(mm):
                wt = mm.args[-1]
                if w is not None:
                    col = g.call_function(aten.unsqueeze.default, (w, 1))
                    wt = g.call_function(aten.mul.Tensor, (col, wt))
                a = g.call_function(aten.view.default, (src, [rows, k]))
                prod = g.call_function(aten.mm.default, (a, wt))
                r = shared
                if in_loop:  # a private copy of the statistic, which the matmul computes
                    c = a
                    if x is not src:
                        c = g.call_function(aten._to_copy.default, (a,), dict(x.kwargs))
                    p = g.call_function(aten.pow.Tensor_Scalar, (c, 2))
                    mean = g.call_function(aten.mean.dim, (p, [-1], True))
                    r = g.call_function(
                        aten.rsqrt.default, (g.call_function(aten.add.Tensor, (mean, chain.eps)),)
                    )
                scaled = g.call_function(aten.mul.Tensor, (prod, r))
                if bias is not None:
                    scaled = g.call_function(aten.add.Tensor, (scaled, bias))
                if dtype(mm) != torch.float32:
                    scaled = g.call_function(aten._to_copy.default, (scaled,), {"dtype": dtype(mm)})
            mm.replace_all_uses_with(scaled)
            g.erase_node(mm)
        changed = True
    return changed


def _norm_output(chain: RmsChain) -> tuple[Node, Node | None] | None:
    """(the norm's output, its weight or None): x * r, then a cast back, then * weight."""
    y, w = chain.mul, None
    u = _only_user(y)
    if u is not None and u.target is aten._to_copy.default and set(u.kwargs) <= {"dtype"}:
        y, u = u, _only_user(u)
    if u is not None and u.target is aten.mul.Tensor:
        other = u.args[0] if u.args[1] is y else u.args[1]
        if isinstance(other, Node) and other.op == "placeholder" and shape(other) == shape(y)[-1:]:
            y, w = u, other
    return y, w


def _matmul_readers(y: Node) -> list[Node] | None:
    """The mm / addmm nodes reading `y` (through a 2-D view) as A, with a weight as B; None
    if any reader is something else."""
    k = shape(y)[-1]
    found = []
    for v in y.users:
        if len(shape(y)) == 2 and v.target in _MATMULS:
            mms = [v]
        elif v.target in _VIEWS and len(shape(v)) == 2 and shape(v)[-1] == k:
            mms = list(v.users)
        else:
            return None
        for mm in mms:
            if mm.target not in _MATMULS or mm.kwargs:
                return None
            a, b = mm.args[-2:]
            if a is not v and a is not y:
                return None
            if not (isinstance(b, Node) and b.op == "placeholder" and len(shape(b)) == 2):
                return None
            found.append(mm)
    return found


def _only_user(node: Node) -> Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


Rewrite = Callable[[GraphModule], bool]
REWRITES: tuple[Rewrite, ...] = (gqa_without_copies, fold_batch_norm, norm_into_matmul)


def rewrite(gm: GraphModule) -> bool:
    """Apply every rewrite in order; True when the graph changed (meta is then stale)."""
    changed = False
    for r in REWRITES:
        changed = r(gm) or changed
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return changed


__all__ = [
    "PROLOGUE_ROWS",
    "REWRITES",
    "fold_batch_norm",
    "gqa_without_copies",
    "norm_into_matmul",
    "repeated_kv",
    "rewrite",
]
