"""Running a `split` stage: each weight matmul computed partly on the GPU, partly on the host
CPU, at the same time (partitioner/gpu_cpu_split.py says why and prices it).

The stage's program (weights as inputs) is rewritten before it is compiled. An MLP block,
down(act(gate(x)) * up(x)) or down(act(up(x))), with its activation as
partitioner/mlp_pattern.py knows it (a 16-bit model's runs in float32 between casts, which go
with the block), becomes one call of
`hetero::gpu_cpu_mlp(x, w_gpu, w_cpu, act, gated)`, split Megatron-style: the GPU takes the
first intermediate features (those rows of gate and up, the same columns of down), the CPU
the rest, each side computes the whole block over its features, and the two [tokens, hidden]
partial sums add on the GPU: one hand-off, and only x and the sums cross. The other matmuls
that read one activation (q/k/v) become one call of `hetero::gpu_cpu_mm(x, w_gpu, w_cpu)`,
where `w_gpu` stacks the first rows of each of their weights and `w_cpu` the other rows; the
graph then puts each output's two halves side by side. The GPU's shares stream to it; the
CPU's stay in host memory, in the plan's CPU dtype. Each op queues the GPU's work, copies
`x` to the host, computes there while the GPU works, and returns the CPU's part.
Everything else of the program compiles as usual around the ops.

Custom ops rather than Python in the graph: the compiler sees one opaque call with known
output shapes and fuses the rest of the layer around it. A block that does not match
(biases in it, a value inside it read elsewhere, an output narrower or wider than its
input) splits matmul by matmul.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm
from hetero.partitioner import mlp_pattern

_MM = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
_TRANSPOSE = (torch.ops.aten.permute.default, torch.ops.aten.t.default)


@dataclass(frozen=True)
class SharedMatmuls:
    """Matmuls split together, one hand-off: either matmuls of one activation, their weights'
    GPU rows stacked in one matrix and the CPU rows in another (`gpu_cpu_mm`); or, `act`
    set, an MLP block whose GPU and CPU each take some of its intermediate features
    (`gpu_cpu_mlp`): the rows of gate and up and the same columns of down."""

    weights: tuple[str, ...]  # param names, in stacking order; an MLP's: (gate,) up, down
    gpu_rows: tuple[int, ...]  # rows of each computed on the GPU (an MLP: features, each)
    rows: tuple[int, ...]  # each weight's rows (an MLP: its intermediate features, each)
    act: str = ""  # an MLP's activation (backends.gpu_cpu_mm.ACTIVATIONS); "": not an MLP
    gated: bool = False  # an MLP with a gate: down(act(gate(x)) * up(x))

    def cut(
        self, weights: Mapping[str, torch.Tensor], cpu_dtype: torch.dtype | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the GPU's share, the CPU's share in `cpu_dtype`) of the full host `weights`."""
        full = [weights[w] for w in self.weights]
        if self.act:
            # down's columns transposed to rows: both sides then hold [features, hidden]
            # blocks that stack, so each side's share is one tensor (one input, one stream).
            # The CPU's down block keeps down's own order instead ([hidden, features] row after
            # row, in as many elements; mlp_share(host=True) reads it back): the host's
            # product then reads the weight as x @ W.T, the GEMV its kernels are fast at. As
            # h @ W over [features, hidden], torch 2.13's CPU product ran float16 at 0.3 GB/s
            # and bfloat16 at 12.7, against 35 and 29 (2-core dev box, 8,600 features), and a
            # GPU run's split layers (H200, run 26) measured their CPU rows at about half the
            # calibrated rate. cuBLAS reads either layout at full speed.
            r = self.gpu_rows[0]
            *inner, down = full
            gpu = torch.cat([*(w[:r] for w in inner), down[:, :r].t()])
            host_down = down[:, r:].contiguous().view(-1, down.shape[0])
            cpu = torch.cat([*(w[r:] for w in inner), host_down])
        else:
            gpu = torch.cat([w[:n] for w, n in zip(full, self.gpu_rows, strict=True)])
            cpu = torch.cat([w[n:] for w, n in zip(full, self.gpu_rows, strict=True)])
        cpu = cpu.to(cpu_dtype) if cpu_dtype is not None else cpu
        return gpu.contiguous(), cpu.contiguous()


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


_MUL = torch.ops.aten.mul.Tensor


@dataclass(frozen=True)
class _Mlp:
    """A matched MLP block: down(act(gate(x)) * up(x)), or down(act(up(x))) without gate."""

    x: Node  # the activation gate/up read (2-D)
    gate: Node | None  # the mm nodes
    up: Node
    down: Node
    act: str


def _unview(n: object) -> object:
    while isinstance(n, Node) and n.target in _VIEWS:
        n = n.args[0]
    return n


class _FxValues:
    """The program's fx nodes as mlp_pattern's rule reads values."""

    def target(self, v: object) -> str | None:
        ok = isinstance(v, Node) and v.op == "call_function"
        return str(v.target) if ok else None

    def tensors(self, v: Node) -> tuple[Node, ...]:
        return tuple(a for a in v.args if isinstance(a, Node))

    def dtype(self, v: Node) -> str:
        val = v.meta.get("val")
        return str(val.dtype).removeprefix("torch.") if isinstance(val, torch.Tensor) else ""

    def unview(self, v: object) -> object:
        return _unview(v)

    def kwarg(self, v: Node, key: str) -> object:
        return v.kwargs.get(key)


_FX = _FxValues()


def _activation(n: object) -> tuple[str, object] | None:
    """(the activation's name, the value it reads) when `n` is one of the MLP activations
    (partitioner/mlp_pattern.py: the planner's rule too)."""
    return mlp_pattern.activation(_FX, n) if isinstance(n, Node) else None


@dataclass(frozen=True)
class _Weights:
    """The matmuls of split weights: mm node -> its weight's name, and each weight's shape."""

    of: Mapping[Node, str]
    shapes: Mapping[str, tuple[int, int]]  # (rows, cols)

    def plain(self, n: object) -> bool:
        """A split weight's mm without bias (a bias would need splitting too: not fused)."""
        return isinstance(n, Node) and n.target is _MM[0] and n in self.of

    def shape(self, mm: Node) -> tuple[int, int]:
        return tuple(self.shapes[self.of[mm]])


def _mlp_at(down: Node, weights: _Weights) -> _Mlp | None:
    """The MLP block that `down` (a split weight's mm) ends, or None. Its matmuls must be
    split weights' mms without bias, gate and up of one activation and of one shape, down's
    output as wide as their input (each side's share is one [features, hidden] stack), and
    nothing else may read the block's inner values (they are not computed any more)."""
    if not weights.plain(down):
        return None
    h = _unview(down.args[0])
    m = _gated(h, down, weights) or _not_gated(h, down, weights)
    if m is None or weights.shape(m.up)[1] != weights.shape(down)[0]:
        return None
    if m.gate is not None and weights.shape(m.gate) != weights.shape(m.up):
        return None
    return m if _closed(m) else None


def _gated(h: object, down: Node, weights: _Weights) -> _Mlp | None:
    """h = act(gate(x)) * up(x), either order."""
    if not (isinstance(h, Node) and h.target is _MUL and len(h.args) == 2):
        return None
    for a, b in (h.args, h.args[::-1]):
        act = _activation(_unview(a))
        if act is None:
            continue
        gate, up = _unview(act[1]), _unview(b)
        if (
            weights.plain(gate)
            and weights.plain(up)
            and _same_value(gate.args[0]) == _same_value(up.args[0])
        ):
            return _Mlp(gate.args[0], gate, up, down, act[0])
    return None


def _not_gated(h: object, down: Node, weights: _Weights) -> _Mlp | None:
    """h = act(up(x))."""
    act = _activation(h)
    up = _unview(act[1]) if act is not None else None
    if act is None or not weights.plain(up):
        return None
    return _Mlp(up.args[0], None, up, down, act[0])


def _closed(m: _Mlp) -> bool:
    """Nothing outside the block reads a value between its first matmuls and `down`."""
    inner: set[Node] = set()
    todo = [m.down.args[0]]
    starts = {m.up} | ({m.gate} if m.gate is not None else set())
    while todo:
        n = todo.pop()
        if not isinstance(n, Node) or n in inner:
            continue
        inner.add(n)
        if n not in starts:
            todo.extend(a for a in n.args if isinstance(a, Node))
    if not starts <= inner:
        return False
    return all(set(n.users) <= inner | {m.down} for n in inner)


def _mlps(weights: _Weights) -> list[_Mlp]:
    """The MLP blocks, in graph order; a matmul in two (mm -> act -> mm -> act -> mm) stays
    with the first."""
    taken: set[Node] = set()
    out = []
    for down in weights.of:
        m = _mlp_at(down, weights)
        mms = {m.gate, m.up, m.down} - {None} if m is not None else set()
        if m is not None and not mms & taken:
            taken |= mms
            out.append(m)
    return out


def _weight_mms(graph, params: Mapping[Node, str], names: Iterable[str]) -> dict[Node, str]:
    """{mm node: its weight's name} for the matmuls with a weight in `names`."""
    names = set(names)
    out = {}
    for n in graph.nodes:
        if n.op != "call_function" or n.target not in _MM:
            continue
        w = n.args[1] if n.target is _MM[0] else n.args[2]
        name = _weight_of(w, params)
        if name is not None and name in names:
            out[n] = name
    return out


def _add_inputs(graph, phs: list[Node], k: int) -> tuple[Node, Node]:
    """New placeholders gpu{k}, cpu{k} after the last one."""
    last_ph = phs[-1]
    with graph.inserting_after(last_ph):
        wc = graph.placeholder(f"cpu{k}")
    with graph.inserting_after(last_ph):
        wg = graph.placeholder(f"gpu{k}")
    phs.extend([wg, wc])
    return wg, wc


def _rewrite_rows(graph, mms: list[Node], x: Node, weights: _Weights, fraction, phs, k):
    """The matmuls `mms` of one activation `x` as one gpu_cpu_mm; their group."""
    ws = [weights.of[mm] for mm in mms]
    rows = [int(weights.shapes[w][0]) for w in ws]
    g_rows = [gpu_rows(r, fraction) for r in rows]
    wg, wc = _add_inputs(graph, phs, k)
    with graph.inserting_before(mms[0]):
        both = graph.call_function(gpu_cpu_mm, (x, wg, wc))
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
    return SharedMatmuls(tuple(ws), tuple(g_rows), tuple(rows))


def _rewrite_mlp(graph, m: _Mlp, weights: _Weights, fraction, phs, k) -> SharedMatmuls:
    """The block `m` as one gpu_cpu_mlp (its inner values die with `down`); its group."""
    mms = [mm for mm in (m.gate, m.up, m.down) if mm is not None]
    ws = tuple(weights.of[mm] for mm in mms)
    features = int(weights.shape(m.up)[0])
    r = gpu_rows(features, fraction)
    wg, wc = _add_inputs(graph, phs, k)
    with graph.inserting_before(m.down):
        out = graph.call_function(gpu_cpu_mlp, (m.x, wg, wc, m.act, m.gate is not None))
    m.down.replace_all_uses_with(out)
    n = len(ws)
    return SharedMatmuls(ws, (r,) * n, (features,) * n, m.act, m.gate is not None)


def split_program(
    gm: GraphModule,
    names: Sequence[str],
    fraction: float,
    shapes: Mapping[str, tuple[int, int]],
) -> tuple[GraphModule, tuple[str, ...], tuple[SharedMatmuls, ...]]:
    """Rewrite `gm` (placeholders named by `names`, in order) so the matmuls with a weight
    in `shapes` (name -> (rows, cols)) run through `gpu_cpu_mlp` (whole MLP blocks) or
    `gpu_cpu_mm` (the others, by activation). Returns the new module, the names of its
    inputs (the old ones without the split weights, then `gpu{k}`, `cpu{k}` for each shared
    group k) and the groups."""
    graph = gm.graph
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    params = dict(zip(phs, names, strict=True))
    weights = _Weights(_weight_mms(graph, params, shapes), shapes)
    mlps = _mlps(weights)
    fused = {mm for m in mlps for mm in (m.gate, m.up, m.down)}
    by_x: dict[tuple, list[Node]] = {}
    first_x: dict[tuple, Node] = {}
    for n in weights.of:
        if n not in fused:
            x = n.args[0] if n.target is _MM[0] else n.args[1]
            first_x.setdefault(_same_value(x), x)
            by_x.setdefault(_same_value(x), []).append(n)
    groups = [
        _rewrite_rows(graph, mms, first_x[key], weights, fraction, phs, k)
        for k, (key, mms) in enumerate(by_x.items())
    ]
    for m in mlps:
        groups.append(_rewrite_mlp(graph, m, weights, fraction, phs, len(groups)))
    for mm in [m for ms in by_x.values() for m in ms] + [m.down for m in mlps]:
        graph.erase_node(mm)
    graph.eliminate_dead_code()
    split_weights = {w for g in groups for w in g.weights}
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
    """({gpu{k}: group k's GPU share}, {cpu{k}: its CPU share, in `cpu_dtype`}) from the
    full host weights."""
    gpu, cpu = {}, {}
    for k, g in enumerate(groups):
        gpu[f"gpu{k}"], cpu[f"cpu{k}"] = g.cut(weights, cpu_dtype)
    return gpu, cpu
