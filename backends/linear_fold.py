"""Fold each nn.Linear that torch.export spelled out back into one `aten.linear` call, for
programs run op by op.

torch.export writes a Linear over a [..., K] input as four ops: the input flattened to
[N, K] (`view`), the weight transposed (`permute`/`t`), `mm` or `addmm` (with the bias),
and the product viewed back to [..., M]. Run by the eager backend, each op is a dispatch
(a few microseconds on a CPU), and a small LM's decode step is mostly dispatch: a 4-layer
Qwen2-shaped model ran 388 ops per token where transformers' eager module ran 265, and 290
with this fold and inference mode (benchmarks/decode_ops_cpu.py). `aten.linear` computes the same product with the same
kernels (it flattens and calls addmm/mm itself), so the outputs are bit for bit the same.

Only for op-by-op runs: compilers (Inductor, TVM, hetero's Triton) see the program as
exported, and the GPU/CPU split rewrites its matmuls before any of this runs.
"""

from __future__ import annotations

import torch
from torch import fx

_aten = torch.ops.aten
_MATMULS = (_aten.mm.default, _aten.addmm.default)
_TRANSPOSES = (_aten.permute.default, _aten.t.default)
_VIEWS = (_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default)


def fold_linears(gm: fx.GraphModule) -> int:
    """Rewrites `gm` in place; returns how many Linears it folded."""
    folded = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _MATMULS:
            continue
        found = _linear(node)
        if found is None:
            continue
        out, x, w, bias = found
        with gm.graph.inserting_before(out):
            args = (x, w) if bias is None else (x, w, bias)
            linear = gm.graph.call_function(_aten.linear.default, args)
        linear.meta = dict(out.meta)
        out.replace_all_uses_with(linear)
        folded += 1
    if folded:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return folded


def _linear(mm: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node, fx.Node | None] | None:
    """(the node that ends the Linear: the view back, or the product itself for a 2-D
    input; its input, its weight, its bias) for an mm/addmm that is one, else None."""
    if mm.target == _aten.addmm.default:
        if len(mm.args) != 3 or mm.kwargs:  # beta/alpha other than 1: not a Linear
            return None
        bias, flat, wt = mm.args
    else:
        if len(mm.args) != 2 or mm.kwargs:
            return None
        bias, (flat, wt) = None, mm.args
    if not all(isinstance(n, fx.Node) for n in (flat, wt)):
        return None
    if wt.target not in _TRANSPOSES or not _is_2d_transpose(wt):
        return None
    w = wt.args[0]
    x, out = flat, mm  # a 2-D input: the product is the Linear's output
    (user,) = mm.users if len(mm.users) == 1 else (None,)
    if (
        flat.op == "call_function"
        and flat.target in _VIEWS
        and user is not None
        and user.op == "call_function"
        and user.target in _VIEWS
    ):
        x, out = flat.args[0], user  # [..., K] flattened, and the product viewed back
    shapes = [_shape(n) for n in (x, w, out)]
    if any(s is None for s in shapes) or (bias is not None and _shape(bias) is None):
        return None
    xs, ws, os = shapes
    # linear(x, w) is [*x.shape[:-1], w.shape[0]]: the view back must be exactly that
    if len(ws) != 2 or len(os) != len(xs) or len(xs) < 2:
        return None
    if not (_same(os[:-1], xs[:-1]) and _same(os[-1:], ws[:1]) and _same(xs[-1:], ws[1:])):
        return None
    if bias is not None and not _same(_shape(bias), ws[:1]):
        return None
    return out, x, w, bias


def _is_2d_transpose(node: fx.Node) -> bool:
    if node.target == _aten.t.default:
        return True
    dims = node.args[1] if len(node.args) > 1 else None
    return list(dims or ()) == [1, 0]


def _shape(node: fx.Node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _same(a: tuple, b: tuple) -> bool:
    """Equal sizes, symbolic ones by their expression (a prompt's length is one symbol
    everywhere in a program): no guard is evaluated."""
    return len(a) == len(b) and all(str(p) == str(q) for p, q in zip(a, b, strict=True))
