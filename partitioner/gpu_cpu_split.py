"""A group's weight matmuls shared between a GPU and its host CPU, both at once.

A batch-1 decode step of a model that does not fit its GPU is bound by bytes: every weight
that is not resident is read once per token, either copied over the link to the GPU or read
from host memory by the CPU. The copy engine and the CPU's cores are separate resources, so
the fastest way to read a layer is both at once: the GPU computes the first rows of each
weight matrix with those rows streamed in (prefetched while the previous layer runs), the
CPU computes the other rows from host memory, and the two halves of each output meet on
the GPU. Everything else of the layer (norms, rotary embeddings, attention over its KV
cache, which stays on the GPU) runs on the GPU.

Splitting whole layers between the devices cannot do this at batch 1: layer k+1 needs layer
k's output, so a CPU layer and a streamed layer never run at the same time, and streaming
ahead needs GPU memory the resident layers want (the two trade one for one). Splitting
every matmul by rows keeps both resources busy on every layer.

`split_matmuls` finds the matmuls a group can split (a weight read through a transpose
view: nn.Linear in core ATen); `split_cost` prices the group at its best GPU share and with
its best set of hand-offs: a trip whose hand-off costs more than the CPU's rows save is not
made, its matrices streamed whole to the GPU instead (a 7B layer with ~0.5 ms hand-offs:
its MLP shared, its attention streamed, 3.7 ms against 4.3 with every matmul shared).
Matmuls that read the same activation (q/k/v) share one hand-off, and a whole MLP block
(down(act(gate(x)) * up(x)), or down(act(up(x)))) is one: each side computes all three
matmuls over its share of the intermediate features and only x and the [tokens, hidden]
partial sums cross, where the matmuls one activation at a time also sent the intermediate
activation across (runtime/split_linear.py matches the same blocks in the program; both
know an activation by partitioner/mlp_pattern.py's one rule, which sees through the float32
casts around a 16-bit model's SiLU).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.partitioner import host_dtype, mlp_pattern
from hetero.partitioner.coarsen import Group
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import HostPrecision
from hetero.partitioner.graph import OpGraph, OpNode, itemsize

if TYPE_CHECKING:
    from hetero.partitioner.plan import PlannedPartition

MATMULS = ("aten.mm.default", "aten.addmm.default")
TRANSPOSES = ("aten.permute.default", "aten.t.default", "aten.transpose.int")
# GPU shares tried, in 64ths of each matrix's rows (the extremes are the streamed and the CPU
# placements)
_STEPS = 64


@dataclass(frozen=True)
class SplitMatmul:
    """One matmul whose weight rows can be shared: out = x @ W.T (+ bias)."""

    node: str  # the mm / addmm op
    weight: str  # the weight's placeholder, [rows, cols]
    bias: str | None  # addmm's bias placeholder, split with the rows
    x: str  # the activation it multiplies, through views (matmuls of one x share a hand-off)
    rows: int
    cols: int
    nbytes: int  # the weight's (and bias's) bytes


def split_matmuls(graph: OpGraph, nodes: Sequence[str]) -> tuple[SplitMatmul, ...]:
    """The weight matmuls among `nodes` that can be split by rows."""
    out = []
    for name in nodes:
        op = graph[name]
        if op.target not in MATMULS:
            continue
        bias = op.params[0] if op.target == "aten.addmm.default" and op.params else None
        acts = [v for v in op.inputs if v in graph.nodes or v in graph.inputs]
        views = [v for v in acts if v in graph.nodes and graph[v].target in TRANSPOSES]
        weight_views = [v for v in views if len(graph[v].params) == 1 and not graph[v].inputs]
        if len(weight_views) != 1 or len(acts) != 2:
            continue
        w = graph[weight_views[0]].params[0]
        if w in graph.state:
            continue
        meta = graph[weight_views[0]].in_meta[0]
        if len(meta.hint) != 2:
            continue
        rows, cols = meta.hint
        x = _root(graph, next(v for v in acts if v != weight_views[0]))
        nbytes = graph.params[w][1] + (graph.params[bias][1] if bias else 0)
        out.append(SplitMatmul(name, w, bias, x, int(rows), int(cols), int(nbytes)))
    return tuple(out)


def _root(graph: OpGraph, value: str) -> str:
    """The value a chain of views reads (each Linear of a block flattens the same input
    through its own `view`): matmuls of one root share a hand-off. A view's symbolic sizes
    (a prompt of any length) are inputs too, not what it views."""
    while value in graph.nodes and graph[value].op_class == "view":
        tensors = [v for v in graph[value].inputs if _is_tensor(graph, v)]
        if len(tensors) != 1:
            break
        value = tensors[0]
    return value


@dataclass(frozen=True)
class Handoff:
    """One trip to the CPU and back: x goes to the host, the CPU's share of `outputs` returns."""

    x: str
    outputs: tuple[str, ...]  # an MLP block: its down's output; else the matmuls of x
    mlp: bool = False


def handoffs(graph: OpGraph, mms: Sequence[SplitMatmul]) -> tuple[Handoff, ...]:
    """The hand-offs the split runtime makes for `mms`: one per MLP block, one per
    activation that the other matmuls read."""
    return tuple(h for h, _ in _trips(graph, mms))


def _mlp_blocks(graph: OpGraph, mms: Sequence[SplitMatmul]) -> list[tuple[SplitMatmul, ...]]:
    """The MLP blocks among `mms` as ((gate,) up, down), in order; a matmul in two (mm ->
    act -> mm -> act -> mm) stays with the first, as the runtime does."""
    by_node = {m.node: m for m in mms if m.bias is None}
    taken: set[str] = set()
    out = []
    for down in by_node.values():
        block = _gated(graph, down, by_node) or _not_gated(graph, down, by_node)
        names = {m.node for m in block or ()}
        if block and not names & taken and _stacks(block) and _closed(graph, block):
            taken |= names
            out.append(block)
    return out


@dataclass(frozen=True)
class _OpValues:
    """An OpGraph's values as mlp_pattern's rule reads them."""

    graph: OpGraph

    def target(self, v: str) -> str | None:
        op = self.graph.nodes.get(v)
        return op.target if op is not None else None

    def tensors(self, v: str) -> tuple[str, ...]:
        return tuple(u for u in self.graph[v].inputs if _is_tensor(self.graph, u))

    def dtype(self, v: str) -> str:
        return self.graph.value_meta(v).dtype

    def unview(self, v: str) -> str:
        return _root(self.graph, v)

    def kwarg(self, v: str, key: str) -> object:
        return None  # an OpGraph keeps no op arguments


def _activation(graph: OpGraph, value: str) -> str | None:
    """The value `value`'s activation reads when it is one the runtime fuses (the runtime's
    rule, partitioner/mlp_pattern.py), else None."""
    got = mlp_pattern.activation(_OpValues(graph), value)
    return got[1] if got is not None else None


def _gated(graph: OpGraph, down: SplitMatmul, by_node: dict) -> tuple | None:
    op = graph.nodes.get(down.x)
    if op is None or op.target != mlp_pattern.MUL or len(op.inputs) != 2:
        return None
    for a, b in (op.inputs, op.inputs[::-1]):
        inner = _activation(graph, _root(graph, a))
        gate = by_node.get(_root(graph, inner)) if inner is not None else None
        up = by_node.get(_root(graph, b))
        if gate is not None and up is not None and gate.x == up.x and gate is not up:
            return (gate, up, down)
    return None


def _not_gated(graph: OpGraph, down: SplitMatmul, by_node: dict) -> tuple | None:
    inner = _activation(graph, down.x)
    up = by_node.get(_root(graph, inner)) if inner is not None else None
    return (up, down) if up is not None and up is not down else None


def _stacks(block: tuple[SplitMatmul, ...]) -> bool:
    """Each side's share is one [features, hidden] stack: gate and up of one shape, down's
    output as wide as their input."""
    *first, down = block
    return len({(m.rows, m.cols) for m in first}) == 1 and first[0].cols == down.rows


def _closed(graph: OpGraph, block: tuple[SplitMatmul, ...]) -> bool:
    """Nothing outside the block reads a value between its first matmuls and its down."""
    *first, down = block
    starts = {m.node for m in first}
    inner: set[str] = set()
    todo = [v for v in graph[down.node].inputs if v in graph.nodes]
    while todo:
        v = todo.pop()
        if v in inner or v not in graph.nodes:
            continue
        inner.add(v)
        if v not in starts:  # tensors only: a view's symbolic sizes lead out of the block
            todo.extend(u for u in graph[v].inputs if _is_tensor(graph, u))
    inner -= {v for v in inner if not graph[v].inputs and graph[v].params}  # weight views
    if not starts <= inner or inner & set(graph.outputs):
        return False
    allowed = inner | {down.node}
    return all(set(graph.graph.successors(v)) <= allowed for v in inner)


def _is_tensor(graph: OpGraph, value: str) -> bool:
    return (value in graph.nodes or value in graph.inputs) and graph.value_meta(value).is_tensor


@dataclass(frozen=True)
class SplitCost:
    """A group at its best GPU share."""

    fraction: float  # of each matrix's rows computed on the GPU (its weights streamed)
    seconds: float  # one run: max(link, the GPU's work + hand-offs + the CPU's rows beyond it)
    gpu_bytes: int  # streamed per run (the GPU shares + the group's other weights)
    cpu_bytes: int  # read by the CPU per run
    link_s: float
    cpu_s: float
    handoffs: int  # trips to the CPU and back per run (`handoffs()`: an MLP block is one)
    cpu_dtype: str
    path_s: float = 0.0  # the host's side: the GPU's work, the hand-offs, the CPU's rows beyond
    # the CPU's rows at their calibrated rate (`cpu_s` less the measured `split_cpu` term):
    # what a measured run's excess is fitted against (calibration/generation.split_feedback)
    cpu_calibrated_s: float = 0.0
    # weights of the matmuls not shared: streamed whole to the GPU, no hand-off (a trip whose
    # hand-off costs more than the CPU's rows save: `split_cost`)
    whole: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplitDecision:
    """What a plan decided for one split group: the GPU's share of the shared matmuls' rows,
    and the weights it streams whole (PlannedPartition.split, .split_whole)."""

    fraction: float
    whole: tuple[str, ...] = ()


def split_decisions(partitions: Iterable[PlannedPartition]) -> dict[str, SplitDecision]:
    """Per group of the split partitions among `partitions` (PlannedPartitions), its decision."""
    out = {}
    for p in partitions:
        whole = dict(p.split_whole)
        for group, fraction in p.split:
            out[group] = SplitDecision(fraction, tuple(whole.get(group, ())))
    return out


# A group with more trips than this prices only the split of every matmul (2^trips subsets)
_MAX_TRIPS = 5


@dataclass(frozen=True)
class _Trip:
    """One hand-off's matmuls, priced once for every subset of trips tried."""

    weights: tuple[str, ...]
    nbytes: int  # the matmuls' weights (and biases)
    cpu_s: float  # all their rows on the CPU, in the chosen dtype
    gpu_s: float  # all their rows on the GPU
    handoff_s: float  # the trip itself: x over, the rows back, the CPU call, the flags


def split_cost(
    graph: OpGraph,
    group: Group,
    ops: Sequence[OpNode],
    gpu: DeviceSpec,
    cpu: DeviceSpec,
    cluster: ClusterSpec,
    cm: CostModel,
    *,
    gpu_backend: str,
    cpu_backend: str,
    scale: float = 1.0,
    fixed: SplitDecision | None = None,
    host_precision: HostPrecision = HostPrecision.MODEL,
) -> SplitCost | None:
    """The group's time split between `gpu` and its host `cpu`; None when it has no weight
    matmul (a small layer prices itself out: its hand-offs cost more than they save).
    `fixed`: price this share and these trips only (a running plan's, re-priced).

    Which trips to make is priced too: a trip's hand-off is on the host's serial path (the
    GPU waits for the CPU's rows), while the bytes it saves the link overlap other work. A
    decoder layer whose hand-offs cost ~0.5 ms each (H200 and H100 runs) can be faster with
    only its MLP shared and its attention matrices streamed whole: one hand-off instead of
    three, the link carrying more. Every subset of trips is tried with every GPU share."""
    mms = split_matmuls(graph, [op.name for op in ops])
    if not mms:
        return None
    by_name = {m.node: m for m in mms}
    op_of = {op.name: op for op in ops}
    mm_ops = [op for op in ops if op.name in by_name]
    rest = [op for op in ops if op.name not in by_name]
    other_bytes = sum(op.param_bytes for op in rest)
    # The GPU's own work, bounded by the whole group run there with its weights at hand
    # (as its backend runs it: fused or op by op); its matmul rows overlap the CPU's.
    gpu_all = cm.group_time(group, ops, gpu, backend=gpu_backend, scale=scale)
    cpu_dtype, _ = _cpu_share(mm_ops, cpu, cm, cpu_backend, scale, host_precision)
    own_size = itemsize(_dtype(mm_ops))
    trips = []
    for trip, members in _trips(graph, mms):
        x_bytes = graph.value_bytes(trip.x) * scale
        y_bytes = sum(graph.value_bytes(v) for v in trip.outputs) * scale
        trip_ops = [op_of[m.node] for m in members]
        trips.append(
            _Trip(
                weights=tuple(m.weight for m in members),
                nbytes=sum(m.nbytes for m in members),
                cpu_s=_cpu_time(trip_ops, cpu, cm, cpu_backend, scale, cpu_dtype),
                gpu_s=cm.kernel_time(trip_ops, gpu, scale=scale, backend=gpu_backend),
                # the GPU's worker runs the CPU's rows itself (host memory, its own threads):
                # the copies cross the link, never a hop between workers
                handoff_s=cm.link_time(cluster, gpu.name, cpu.name, x_bytes)
                + cm.link_time(cluster, cpu.name, gpu.name, y_bytes)
                + cm.op_overhead(cpu, "matmul", cpu_dtype, cpu_backend)
                + cm.split_handoff(),
            )
        )
    slow = 1.0 + cm.split_cpu()
    everything = (1 << len(trips)) - 1
    # every trip first: it wins ties (the split as it was before subsets were priced)
    subsets = [everything]
    if len(trips) <= _MAX_TRIPS:
        subsets += list(range(everything - 1, 0, -1))
    steps = range(1, _STEPS)
    if fixed is not None:
        kept_whole = set(fixed.whole)
        subsets = [sum(1 << j for j, t in enumerate(trips) if not set(t.weights) <= kept_whole)]
        steps = [min(_STEPS - 1, max(1, round(fixed.fraction * _STEPS)))]
    best: SplitCost | None = None
    for mask in subsets:
        shared = [t for j, t in enumerate(trips) if mask >> j & 1]
        whole = [t for j, t in enumerate(trips) if not mask >> j & 1]
        split_bytes = sum(t.nbytes for t in shared)
        streamed = other_bytes + sum(t.nbytes for t in whole)
        cpu_mm = sum(t.cpu_s for t in shared)
        gpu_mm = sum(t.gpu_s for t in shared)
        handoff = sum(t.handoff_s for t in shared)
        for k in steps:
            f = k / _STEPS
            link = cm.stream_time(cluster, gpu, f * split_bytes + streamed, beside=cpu_dtype)
            cpu_s = (1 - f) * cpu_mm * slow
            path = gpu_all + handoff + max(0.0, cpu_s - f * gpu_mm)
            t = max(link, path)
            if best is None or t < best.seconds - 1e-12:
                best = SplitCost(
                    fraction=f,
                    seconds=t,
                    gpu_bytes=int(f * split_bytes + streamed),
                    cpu_bytes=int((1 - f) * split_bytes * itemsize(cpu_dtype) / own_size),
                    link_s=link,
                    cpu_s=cpu_s,
                    handoffs=len(shared),
                    cpu_dtype=cpu_dtype,
                    path_s=path,
                    whole=tuple(w for t in whole for w in t.weights),
                    cpu_calibrated_s=(1 - f) * cpu_mm,
                )
    return best


def _trips(
    graph: OpGraph, mms: Sequence[SplitMatmul]
) -> list[tuple[Handoff, tuple[SplitMatmul, ...]]]:
    """`handoffs()` with the matmuls each one carries."""
    blocks = _mlp_blocks(graph, mms)
    fused = {m.node for block in blocks for m in block}
    out = [(Handoff(block[0].x, (block[-1].node,), mlp=True), tuple(block)) for block in blocks]
    by_x: dict[str, list[SplitMatmul]] = {}
    for m in mms:
        if m.node not in fused:
            by_x.setdefault(m.x, []).append(m)
    out += [(Handoff(x, tuple(m.node for m in ms)), tuple(ms)) for x, ms in by_x.items()]
    return out


def _dtype(ops: Sequence[OpNode]) -> str:
    return ops[0].dtype if ops else "float32"


def _cpu_share(
    mm_ops: Sequence[OpNode],
    cpu: DeviceSpec,
    cm: CostModel,
    backend: str,
    scale: float,
    precision: HostPrecision,
) -> tuple[str, float]:
    """(dtype, seconds) of the matmuls run whole on the CPU in the dtype the cost model
    finds fastest for them (partitioner/host_dtype.py says which and their numerics)."""
    own = _dtype(mm_ops)
    candidates = host_dtype.candidates(own, cpu, cm, "matmul", backend, precision)
    priced = [(d, _cpu_time(mm_ops, cpu, cm, backend, scale, d)) for d in candidates]
    if not priced:
        return ("", float("inf"))
    chosen = host_dtype.preferred(own, priced)
    return chosen, dict(priced)[chosen]


def _cpu_time(
    mm_ops: Sequence[OpNode], cpu: DeviceSpec, cm: CostModel, backend: str, scale: float, dtype: str
) -> float:
    """Seconds of the matmuls run whole on the CPU in `dtype`."""
    if not dtype:
        return float("inf")
    t = 0.0
    for op in mm_ops:
        ratio = itemsize(dtype) / itemsize(op.dtype)
        ec, em = cm.efficiency(cpu, "matmul", dtype, backend)
        flops = op.flops * scale / (cpu.peak(dtype) * ec)
        acts = op.bytes_read - op.param_bytes + op.bytes_written
        nbytes = op.param_bytes * ratio + acts * scale
        t += max(flops, nbytes / ((cpu.mem_bandwidth or 1e10) * em))
        t += op.launches * cm.op_overhead(cpu, "matmul", dtype, backend)
    return t
