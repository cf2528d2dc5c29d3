"""capture(): torch.export a model to core ATen and describe every op for costing.

OpGraph wraps a networkx.DiGraph whose nodes are the exported program's compute
nodes (call_function), each with an `OpNode` holding its op, shapes, dtypes, FLOPs,
bytes and the parameters it reads; edges carry the bytes that flow between ops.
"""

from __future__ import annotations

import contextlib
import io
import logging
import operator
import sys
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import networkx as nx
import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from hetero.environment import filter_known_warnings
from hetero.errors import CaptureError, where_raised
from hetero.partitioner.coarsen import coarsen
from hetero.partitioner.opinfo import count_flops, numel, op_class

# Checks torch.export inserts; they compute nothing and would only pin partitions together.
_DROPPED = {
    torch.ops.aten._assert_tensor_metadata.default,
    torch.ops.aten._assert_scalar.default,
    torch.ops.aten.sym_constrain_range_for_size.default,
}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclass(frozen=True)
class TensorMeta:
    """Shape (a str where a dim is symbolic), the example's concrete sizes, and dtype."""

    shape: tuple[int | str, ...]
    hint: tuple[int, ...]
    # "float32", "bool", ...; for non-tensors "symint" / "int" / "float" / "pybool" / "none"
    # (a Python bool is not a bool tensor: a 2 MiB causal mask crossing a cut is 2 MiB)
    dtype: str

    @property
    def is_tensor(self) -> bool:
        return self.dtype not in ("symint", "int", "float", "pybool", "none", "other")

    @property
    def nbytes(self) -> int:
        if not self.is_tensor:
            return 8 if self.dtype != "none" else 0
        return numel(self.hint) * itemsize(self.dtype)

    @property
    def dynamic(self) -> bool:
        return any(isinstance(s, str) for s in self.shape)

    def __str__(self) -> str:
        if not self.is_tensor:
            return self.dtype
        return f"{self.dtype}[{', '.join(str(s) for s in self.shape)}]"


def itemsize(dtype: str) -> int:
    """Bytes per element of the dtype named `dtype` ("float16": 2; unknown names: 4)."""
    try:
        return getattr(torch, dtype).itemsize
    except AttributeError:
        return 4


def _hint(s: Any) -> int:
    """The example's concrete size of a (possibly symbolic) dim."""
    if isinstance(s, int):
        return s
    node = getattr(s, "node", None)
    hint = getattr(node, "hint", None)
    if hint is not None:
        return int(hint)
    try:
        return int(node.shape_env.size_hint(node.expr))
    except Exception:  # an unbacked symbol has no example value
        return 1


def tensor_meta(val: Any) -> TensorMeta:
    if isinstance(val, torch.Tensor):
        # A SymInt that export proved constant prints as a number: it is a static dim.
        shape = tuple(
            int(s) if isinstance(s, int) or str(s).isdigit() else str(s) for s in val.shape
        )
        return TensorMeta(shape, tuple(_hint(s) for s in val.shape), dtype_name(val.dtype))
    if isinstance(val, torch.SymInt):
        # Its expression ("128*s77") lets a partition that receives it relate it to its
        # tensors' dims when compiled for dynamic shapes.
        return TensorMeta((str(val),), (_hint(val),), "symint")
    if val is None:
        return TensorMeta((), (), "none")
    if isinstance(val, bool):
        return TensorMeta((), (), "pybool")
    if isinstance(val, int):
        return TensorMeta((), (), "int")
    if isinstance(val, float):
        return TensorMeta((), (), "float")
    return TensorMeta((), (), "other")


@dataclass(frozen=True)
class OpNode:
    """One core-ATen op of the captured graph, with what a cost model needs."""

    name: str  # the fx node's name, unique in the graph
    target: str  # e.g. "aten.addmm.default"
    op_class: str  # matmul | conv | attention | norm | reduction | elementwise | data | view
    inputs: tuple[str, ...]  # values it reads: user inputs or other nodes' names
    params: tuple[str, ...]  # parameter/buffer/constant placeholders it reads directly
    in_meta: tuple[TensorMeta, ...]
    out_meta: tuple[TensorMeta, ...]
    flops: int
    bytes_read: int
    bytes_written: int
    param_bytes: int  # weights it owns: read directly or through views (a Linear's transpose)
    launches: int  # kernels it costs when run alone (0 for views)
    module_stack: tuple[tuple[str, str], ...]  # (path, type) from the outermost submodule in
    stack_trace: str = ""
    state_bytes: int = 0  # buffers it updates in place (a KV cache): never streamed nor moved

    @property
    def module(self) -> str:
        return self.module_stack[-1][0] if self.module_stack else ""

    def module_at(self, depth: int) -> str:
        """The enclosing module `depth` levels below the root ('' for root-level ops)."""
        if depth <= 0 or not self.module_stack:
            return ""
        return self.module_stack[min(depth, len(self.module_stack)) - 1][0]

    @property
    def dtype(self) -> str:
        for m in self.out_meta:
            if m.is_tensor:
                return m.dtype
        return "float32"

    @property
    def source_line(self) -> str:
        """The last user frame of the stack trace, for error messages."""
        lines = [ln.strip() for ln in self.stack_trace.strip().splitlines() if ln.strip()]
        frames = [ln for ln in lines if ln.startswith("File ")]
        return frames[-1] if frames else (lines[-1] if lines else "")


class OpGraph:
    """The captured program and its ops as a networkx DiGraph (node name -> OpNode)."""

    def __init__(
        self,
        program: ExportedProgram,
        nodes: dict[str, OpNode],
        inputs: dict[str, TensorMeta],
        outputs: tuple[str, ...],
        params: dict[str, tuple[str, int]],
        model_name: str = "model",
    ) -> None:
        self.program = program
        self.nodes = nodes  # topological order
        self.inputs = inputs  # user input placeholder name -> meta
        self.outputs = outputs  # value names of the flattened user outputs
        self.params = params  # placeholder name -> (fqn, nbytes)
        self.model_name = model_name
        # buffers the program updates in place (a KV cache): they live on the device that
        # runs their writer and never travel (partitioner/phases.py)
        self.state: frozenset[str] = frozenset()
        g = nx.DiGraph()
        for n in nodes.values():
            g.add_node(n.name, op=n)
        for n in nodes.values():
            for src in n.inputs:
                if src in nodes:
                    nbytes = sum(m.nbytes for m in nodes[src].out_meta)
                    g.add_edge(src, n.name, bytes=nbytes)
        self.graph = g
        # What the model returns, as a pytree spec: torch builds a NamedTuple class each time
        # `call_spec` is read (~0.15 ms a call on the 2-core box), so it is read once.
        self.out_spec = program.call_spec.out_spec

    # ---- views -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.nodes)

    def __iter__(self):
        return iter(self.nodes.values())

    def __getitem__(self, name: str) -> OpNode:
        return self.nodes[name]

    @property
    def order(self) -> tuple[str, ...]:
        return tuple(self.nodes)

    @property
    def dynamic(self) -> bool:
        return any(m.dynamic for m in self.inputs.values())

    @property
    def total_flops(self) -> int:
        return sum(n.flops for n in self.nodes.values())

    @property
    def param_bytes(self) -> int:
        return sum(b for _, b in self.params.values())

    def value_meta(self, name: str) -> TensorMeta:
        """Meta of a value: a user input, a parameter or an op's (first) output."""
        if name in self.inputs:
            return self.inputs[name]
        if name in self.nodes:
            outs = self.nodes[name].out_meta
            return outs[0] if len(outs) == 1 else TensorMeta((), (), "other")
        raise KeyError(name)

    def value_bytes(self, name: str) -> int:
        if name in self.inputs:
            return self.inputs[name].nbytes
        if name in self.params:
            return self.params[name][1]
        return sum(m.nbytes for m in self.nodes[name].out_meta)

    def coarsen(self, depth: int | None = None, max_groups: int = 64):
        return coarsen(self, depth=depth, max_groups=max_groups)

    def module_summary(self, depth: int = 1) -> list[dict[str, Any]]:
        """Per module at `depth`: ops, FLOPs, bytes moved and parameter bytes."""
        rows: dict[str, dict[str, Any]] = {}
        seen_params: dict[str, set[str]] = {}
        for n in self.nodes.values():
            key = n.module_at(depth) or "(root)"
            row = rows.setdefault(
                key,
                {"module": key, "type": "", "ops": 0, "flops": 0, "bytes": 0, "param_bytes": 0},
            )
            if not row["type"] and n.module_stack:
                row["type"] = n.module_stack[min(depth, len(n.module_stack)) - 1][1].split(".")[-1]
            row["ops"] += 1 if n.op_class != "view" else 0
            row["flops"] += n.flops
            row["bytes"] += n.bytes_read + n.bytes_written
            for p in n.params:
                if p not in seen_params.setdefault(key, set()):
                    seen_params[key].add(p)
                    row["param_bytes"] += self.params[p][1]
        return list(rows.values())

    def op_counts(self) -> Counter:
        return Counter(n.target for n in self.nodes.values())


# ---- capture -------------------------------------------------------------------------------


def decomposition_table() -> dict:
    """Core ATen, except scaled_dot_product_attention.

    SDPA stays one node: backends fuse it into one attention kernel, and torch's CPU
    decomposition of it yields strides that a following `view` rejects (GPT-2 fails).
    """
    table = torch.export.default_decompositions()
    table.pop(torch.ops.aten.scaled_dot_product_attention.default, None)
    return table


def capture(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    dynamic_shapes: Any = None,
    *,
    kwargs: Mapping[str, Any] | None = None,
) -> OpGraph:
    """Export `model` with torch.export (non-strict), decompose to core ATen, describe each op.

    A model built on the meta device (with meta example inputs) captures the same ops, FLOPs
    and weight bytes (from shapes) without any weight in memory: enough to plan, not to run.
    """
    if not isinstance(example_inputs, tuple | list):
        example_inputs = (example_inputs,)
    name = type(model).__name__
    model.eval()
    try:
        with torch.no_grad(), _one_report(), _cache_off(model, kwargs or {}):
            ep = torch.export.export(
                model,
                tuple(example_inputs),
                kwargs=dict(kwargs or {}),
                dynamic_shapes=dynamic_shapes,
                strict=False,
            )
            ep = ep.run_decompositions(decomposition_table())
    except Exception as e:  # torch raises many types here; all mean "cannot capture"
        raise CaptureError(_capture_message(name, e)) from e
    return from_exported(ep, model_name=name)


@contextlib.contextmanager
def _cache_off(model: torch.nn.Module, kwargs: Mapping[str, Any]):
    """A model whose `config.use_cache` is on (transformers' LMs, encoder-decoders) returns
    its KV cache, an object torch.export cannot return, and a forward graph has no cache to
    carry from one call to the next: it is captured with the cache off (its outputs'
    `past_key_values` are None; the rest is the model's), unless the call passes
    `use_cache` itself. The config is put back after."""
    config = getattr(model, "config", None)
    if "use_cache" in kwargs or getattr(config, "use_cache", None) is not True:
        yield
        return
    config.use_cache = False
    try:
        yield
    finally:
        config.use_cache = True


@contextlib.contextmanager
def _one_report():
    """A failed export is reported once, by the CaptureError: torch also logs it (a
    traceback at ERROR, the guard at WARNING) and prints the partial graph to stderr. Both
    are held back while torch.export runs (at DEBUG they are let through); what else was
    written to stderr meanwhile is written after it, when the export succeeds (in the main
    thread only: stderr belongs to the whole process). torch's pytree deprecation warnings,
    which every export raises and nobody but torch can act on, are filtered from here on
    (hetero/environment.py: that one message, nothing else)."""
    filter_known_warnings()
    torch_log = logging.getLogger("torch")
    main = threading.current_thread() is threading.main_thread()
    if not main or logging.getLogger("hetero").isEnabledFor(logging.DEBUG):
        yield
        return
    level, held = torch_log.level, io.StringIO()
    torch_log.setLevel(logging.CRITICAL)
    ok = False
    try:
        with contextlib.redirect_stderr(held):
            yield
        ok = True
    finally:
        torch_log.setLevel(level)
        if ok and held.getvalue():
            sys.stderr.write(held.getvalue())


def _capture_message(name: str, e: Exception) -> str:
    """What failed, first the user's line that torch.export stopped at (so a long torch
    message cannot push it out of view), then the head of torch's message and what to do."""
    text = str(e).strip()
    lines = [l for l in text.splitlines() if l.strip() and not l.startswith(_TORCH_ADVICE)]
    head = "\n    ".join(lines[:8]) + ("\n    ..." if len(lines) > 8 else "")
    hint = "Fix the model at that line, or give example inputs it accepts."
    if "data-dependent" in text or "GuardOnDataDependent" in type(e).__name__:
        hint = (
            "Data-dependent Python control flow must become torch.cond or be made static; "
            "outputs must be tensors or pytree containers of tensors (for transformers "
            "models, build the config with use_cache=False)."
        )
    elif "in output, which is not a known type" in text:
        hint = (
            "The model returns an object torch.export cannot return (not a tensor, nor a "
            "pytree container of tensors): return tensors (or register the type with "
            "torch.utils._pytree.register_pytree_node), or compile a wrapper module that "
            "returns the tensors you need."
        )
    elif "Constraints violated" in text or "specializ" in text:
        hint = "A dim marked dynamic was specialised by the model: mark it static or fix the model's use of it."
    return (
        f"torch.export could not capture {name} ({type(e).__name__}){where_raised(e)}\n"
        f"    {head}\n  What to do: {hint}"
    )


# torch's debugging advice that follows its messages (environment variables, links)
_TORCH_ADVICE = (
    "For more information",
    "For extended logs",
    "If you suspect",
    "For more debugging help",
    "For C++ stack trace",
    "The following call raised",
    "The error above occurred",
    "Caused by:",
    "  File ",
    "    ",
)


def from_exported(
    ep: ExportedProgram, model_name: str = "model", mutable: frozenset[str] = frozenset()
) -> OpGraph:
    """`mutable`: placeholders of buffers the graph updates in place (partitioner/phases.py);
    they are no weights: ops that write them count them as `state_bytes`."""
    gm = ep.graph_module
    for node in list(gm.graph.nodes):
        # An unread getitem computes nothing: torch.export.load writes one for every unused
        # output of a multi-output op, which a program captured here did not have.
        dead = node.target in _DROPPED or node.target is operator.getitem
        if node.op == "call_function" and dead and not node.users:
            gm.graph.erase_node(node)
    gm.recompile()

    sig = ep.graph_signature
    state = dict(ep.state_dict)
    state.update(ep.constants)
    params: dict[str, tuple[str, int]] = {}
    user_inputs: dict[str, TensorMeta] = {}
    for spec in sig.input_specs:
        arg = spec.arg
        if spec.kind == InputKind.USER_INPUT:
            node = next(n for n in gm.graph.nodes if n.op == "placeholder" and n.name == arg.name)
            user_inputs[arg.name] = tensor_meta(node.meta.get("val"))
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            t = state.get(spec.target)
            nbytes = t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0
            params[arg.name] = (spec.target, nbytes)

    nodes: dict[str, OpNode] = {}
    last_stack: tuple[tuple[str, str], ...] = ()
    param_alias: dict[str, tuple[str, ...]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        ins, ps, owned, in_meta = [], [], [], []
        for a in node.all_input_nodes:
            if a.name in params:
                ps.append(a.name)
                if a.name not in mutable:
                    owned.append(a.name)
            else:
                ins.append(a.name)
                owned.extend(param_alias.get(a.name, ()))
            in_meta.append(tensor_meta(a.meta.get("val")))
        val = node.meta.get("val")
        outs = (
            tuple(tensor_meta(v) for v in val)
            if isinstance(val, tuple | list)
            else (tensor_meta(val),)
        )
        cls = "view" if node.target is operator.getitem else op_class(node.target)
        stack = _module_stack(node)
        if stack is None:  # no metadata (rare): assume the previous op's module
            stack = last_stack
        last_stack = stack
        flops = _flops(node, cls)
        moves = cls != "view"
        if not moves and node.all_input_nodes and not ins:
            # A view of a weight (nn.Linear's transpose): its consumer owns the weight.
            param_alias[node.name] = tuple(dict.fromkeys(owned))
            owned = []
        nodes[node.name] = OpNode(
            name=node.name,
            target=_target_name(node.target),
            op_class=cls,
            inputs=tuple(dict.fromkeys(ins)),
            params=tuple(dict.fromkeys(ps)),
            in_meta=tuple(in_meta),
            out_meta=outs,
            flops=flops,
            bytes_read=sum(m.nbytes for m in in_meta if m.is_tensor) if moves else 0,
            bytes_written=sum(m.nbytes for m in outs if m.is_tensor) if moves else 0,
            param_bytes=sum(params[p][1] for p in dict.fromkeys(owned)),
            launches=1 if moves else 0,
            module_stack=stack,
            stack_trace=node.meta.get("stack_trace", "") or "",
            state_bytes=sum(params[p][1] for p in dict.fromkeys(ps) if p in mutable),
        )

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = tuple(a.name if isinstance(a, torch.fx.Node) else "" for a in out_node.args[0])
    g = OpGraph(ep, nodes, user_inputs, outputs, params, model_name=model_name)
    g.state = frozenset(mutable)
    return g


def _target_name(target) -> str:
    if target is operator.getitem:
        return "getitem"
    return str(target)


def _module_stack(node: torch.fx.Node) -> tuple[tuple[str, str], ...] | None:
    stack = node.meta.get("nn_module_stack")
    if stack is None:
        return None
    entries = []
    for path, typ in stack.values():
        if not path:  # the root module
            continue
        type_name = typ if isinstance(typ, str) else getattr(typ, "__qualname__", str(typ))
        entries.append((str(path), str(type_name)))
    return tuple(entries)


def _example(a: Any) -> Any:
    """Concrete (meta-device) stand-ins for an op's values. Never let a FakeTensor with
    symbolic sizes through: arithmetic on its sizes (int(), math.prod) adds a guard that
    specializes the dynamic dim in the program's ShapeEnv for good."""
    if isinstance(a, torch.fx.Node):
        return _example(a.meta.get("val"))
    if isinstance(a, torch.Tensor):
        return torch.empty([_hint(s) for s in a.shape], dtype=a.dtype, device="meta")
    if isinstance(a, torch.SymInt):
        return _hint(a)
    if isinstance(a, list | tuple):
        return type(a)(_example(x) for x in a)
    return a


def _flops(node: torch.fx.Node, cls: str) -> int:
    if cls == "view":
        return 0
    args = _example(node.args)
    out = _example(node)
    in_numels = [
        numel([_hint(s) for s in a.meta["val"].shape])
        for a in node.all_input_nodes
        if isinstance(a.meta.get("val"), torch.Tensor)
    ]
    vals = out if isinstance(out, tuple | list) else (out,)
    out_numels = [numel(v.shape) for v in vals if isinstance(v, torch.Tensor)]
    primary = vals[0] if vals else None
    return count_flops(
        node.target,
        args,
        primary,
        in_numels,
        out_numels[:1] if cls != "elementwise" else out_numels,
    )
