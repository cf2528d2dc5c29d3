"""Running a `split` stage: each weight matmul computed partly on the GPU, partly on the host
CPU, at the same time (partitioner/gpu_cpu_split.py says why and prices it).

The stage's program (weights as inputs) is rewritten before it is compiled: the matmuls
that read one activation (q/k/v, gate/up) become one call of the custom op
`hetero::gpu_cpu_mm(x, w_gpu, w_cpu)`, where `w_gpu` stacks the first rows of each of their
weights (streamed to the GPU) and `w_cpu` the other rows (in host memory, in the plan's
CPU dtype). The op queues the GPU's product, copies `x` to the host, multiplies there
while the GPU works, and copies the CPU's rows back; the graph then puts each output's two
halves side by side. Everything else of the program compiles as usual around the op.

A custom op rather than Python in the graph: the compiler sees one opaque call with known
output shapes and fuses the rest of the layer around it.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from hetero.backends.gpu_cpu_mm import gpu_cpu_mm

_MM = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_TRANSPOSE = (torch.ops.aten.permute.default, torch.ops.aten.t.default)


@dataclass(frozen=True)
class SharedMatmuls:
    """Matmuls of one activation, split together: their weights' GPU rows stacked in one
    matrix, the CPU rows in another."""

    weights: tuple[str, ...]  # param names, in stacking order
    gpu_rows: tuple[int, ...]  # rows of each computed on the GPU
    rows: tuple[int, ...]  # each weight's rows


def gpu_rows(rows: int, fraction: float) -> int:
    """Rows of an `rows`-row matrix the GPU takes at `fraction`: whole tiles of 64 rows on
    real layers (the GPU's and the CPU's kernels both like them), any count on tiny ones."""
    step = 64 if rows >= 1024 else 1
    return max(0, min(rows, round(fraction * rows / step) * step))


def _weight_of(node: Node, params: Mapping[Node, str]) -> str | None:
    """The param read by `node` = transpose(param) (nn.Linear's weight), else None."""
    if not isinstance(node, Node) or node.target not in _TRANSPOSE:
        return None
    src = node.args[0]
    if node.target is torch.ops.aten.permute.default and list(node.args[1]) != [1, 0]:
        return None
    return params.get(src)


_VIEWS = (
    torch.ops.aten.view.default,
    torch.ops.aten._unsafe_view.default,
    torch.ops.aten.reshape.default,
)


def _same_value(x: Node) -> tuple:
    """A key equal for `x` and any other view of the same tensor with the same shape (each
    Linear of a block flattens the block's input through its own `view`)."""
    root = x
    while isinstance(root, Node) and root.target in _VIEWS:
        root = root.args[0]
    shape = tuple(x.args[1]) if isinstance(x, Node) and x.target in _VIEWS else None
    return (root, shape)


def split_program(
    gm: GraphModule,
    names: Sequence[str],
    fraction: float,
    rows_of: Mapping[str, int],
) -> tuple[GraphModule, tuple[str, ...], tuple[SharedMatmuls, ...]]:
    """Rewrite `gm` (placeholders named by `names`, in order) so the matmuls with a weight
    in `rows_of` (name -> rows) run through `gpu_cpu_mm`. Returns the new module, the names
    of its inputs (the old ones without the split weights, then `gpu{k}`, `cpu{k}` for each
    shared group k) and the groups."""
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    params = dict(zip(phs, names, strict=True))
    by_x: dict[tuple, list[Node]] = {}
    first_x: dict[tuple, Node] = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _MM:
            continue
        x, w = (n.args[0], n.args[1]) if n.target is _MM[0] else (n.args[1], n.args[2])
        name = _weight_of(w, params)
        if name is None or name not in rows_of:
            continue
        key = _same_value(x)
        first_x.setdefault(key, x)
        by_x.setdefault(key, []).append(n)
    groups = []
    split_weights: set[str] = set()
    for k, (key, mms) in enumerate(by_x.items()):
        x = first_x[key]
        ws, rows, g_rows = [], [], []
        for mm in mms:
            wnode = mm.args[1] if mm.target is _MM[0] else mm.args[2]
            w_name = params[wnode.args[0]]
            r = int(rows_of[w_name])
            ws.append(w_name)
            rows.append(r)
            g_rows.append(gpu_rows(r, fraction))
        groups.append(SharedMatmuls(tuple(ws), tuple(g_rows), tuple(rows)))
        split_weights.update(ws)
        last_ph = phs[-1]
        with graph.inserting_after(last_ph):
            wc = graph.placeholder(f"cpu{k}")
        with graph.inserting_after(last_ph):
            wg = graph.placeholder(f"gpu{k}")
        phs.extend([wg, wc])
        with graph.inserting_before(mms[0]):
            both = graph.call_function(gpu_cpu_mm._opoverload, (x, wg, wc))
            y_gpu = graph.call_function(operator.getitem, (both, 0))
            y_cpu = graph.call_function(operator.getitem, (both, 1))
        og = oc = 0
        for mm, r, g in zip(mms, rows, g_rows, strict=True):
            with graph.inserting_before(mm):
                a = graph.call_function(torch.ops.aten.slice.Tensor, (y_gpu, 1, og, og + g))
                b = graph.call_function(torch.ops.aten.slice.Tensor, (y_cpu, 1, oc, oc + r - g))
                out = graph.call_function(torch.ops.aten.cat.default, ([a, b], 1))
                if mm.target is _MM[1]:  # addmm: the bias after the halves meet
                    out = graph.call_function(torch.ops.aten.add.Tensor, (out, mm.args[0]))
            mm.replace_all_uses_with(out)
            og, oc = og + g, oc + r - g
    for mm in [m for ms in by_x.values() for m in ms]:
        graph.erase_node(mm)
    graph.eliminate_dead_code()
    kept = []
    for ph in [n for n in graph.nodes if n.op == "placeholder"]:
        name = params.get(ph, ph.name)
        if name in split_weights and not ph.users:
            graph.erase_node(ph)
        else:
            kept.append(name)
    graph.lint()
    return GraphModule(gm, graph), tuple(kept), tuple(groups)


def shares(
    weights: Mapping[str, torch.Tensor],
    groups: Sequence[SharedMatmuls],
    cpu_dtype: torch.dtype | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({gpu{k}: stacked GPU rows}, {cpu{k}: stacked CPU rows, in `cpu_dtype`}) from the
    full host weights."""
    gpu, cpu = {}, {}
    for k, g in enumerate(groups):
        top = [weights[w][:n] for w, n in zip(g.weights, g.gpu_rows, strict=True)]
        rest = [weights[w][n:] for w, n in zip(g.weights, g.gpu_rows, strict=True)]
        gpu[f"gpu{k}"] = torch.cat(top).contiguous()
        c = torch.cat(rest).contiguous()
        cpu[f"cpu{k}"] = c.to(cpu_dtype) if cpu_dtype is not None else c
    return gpu, cpu
