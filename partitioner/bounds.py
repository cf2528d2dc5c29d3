"""The values a request may hold: which user inputs index a table, and how large it is.

An input that reaches an embedding lookup, a gather, an index or a scatter only
through views and casts indexes that op's table: every element must lie in the table's
range, or a compiled kernel reads (or writes) outside it. The same holds for a dynamic
dim whose `arange` indexes a table (a position embedding): a prompt longer than the table
reads past its end. This module reads both bounds off the captured graph, so the ways in
can refuse such a request before anything runs (interfaces/validation.py).

Only what the graph proves is derived: an index computed by arithmetic (`idx + 1`), or a
slice of an input (whose other elements may mean something else), gives no bound; the
backends' own gathers stay memory-safe for those (backends/tvm/frontend.py).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import fx

from hetero.partitioner.graph import OpGraph

# op -> (position of the index argument, position of the dim argument or None for dim 0,
# whether the op takes negative indices the way Python does). aten.index / index_put take
# a list of index tensors (one per leading dim) and are handled apart.
_INDEXING: dict[str, tuple[int, int | None, bool]] = {
    "aten.embedding.default": (1, None, False),
    "aten.index_select.default": (2, 1, False),
    "aten.gather.default": (2, 1, False),
    "aten.scatter.src": (2, 1, False),
    "aten.scatter.value": (2, 1, False),
    "aten.scatter_add.default": (2, 1, False),
    "aten.scatter_reduce.two": (2, 1, False),
    "aten.index_add.default": (2, 1, False),
    "aten.index_copy.default": (2, 1, False),
    "aten.index_fill.int_Scalar": (2, 1, False),
    "aten.index_fill.int_Tensor": (2, 1, False),
}
_INDEX_LISTS = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default"}
_TAKE = "aten.take.default"  # indexes the flattened table

# Ops through which every element of their input reaches their output unchanged (views,
# copies, dtype casts): an index that passed through one is still the caller's value.
_TRANSPARENT = {
    "aten.view.default",
    "aten._unsafe_view.default",
    "aten.reshape.default",
    "aten.expand.default",
    "aten.unsqueeze.default",
    "aten.squeeze.default",
    "aten.squeeze.dim",
    "aten.squeeze.dims",
    "aten.permute.default",
    "aten.t.default",
    "aten.transpose.int",
    "aten.clone.default",
    "aten.contiguous.default",
    "aten.alias.default",
    "aten.detach.default",
    "aten.lift_fresh_copy.default",
    "aten._to_copy.default",
    "aten.to.dtype",
    "aten.flatten.using_ints",
}
_ARANGE = {"aten.arange.default", "aten.arange.start", "aten.arange.start_step"}


@dataclass(frozen=True)
class IndexUse:
    """One op that indexes a table with a value the caller controls."""

    op: str  # "aten.embedding.default"
    node: str  # the fx node's name
    size: int  # the table's size along the indexed dim
    negative: bool  # the op also takes -size..-1 (counting from the end)
    where: str = ""  # the model's source line, when torch recorded it

    @property
    def low(self) -> int:
        return -self.size if self.negative else 0

    def describe(self) -> str:
        op = self.op.removeprefix("aten.").removesuffix(".default")
        return f"{op} of a table of {self.size}" + (f" in {self.where}" if self.where else "")


@dataclass(frozen=True)
class IndexBound:
    """Every element of user input `input` must lie in [low, high)."""

    input: str
    uses: tuple[IndexUse, ...]

    @property
    def low(self) -> int:
        return max(u.low for u in self.uses)

    @property
    def high(self) -> int:
        return min(u.size for u in self.uses)

    def describe(self) -> str:
        return f"[{self.low}, {self.high}) ({'; '.join(u.describe() for u in self.uses)})"


@dataclass(frozen=True)
class DimLimit:
    """A dynamic dim that an `arange` turns into indices: it may be at most `most`."""

    symbol: str
    uses: tuple[IndexUse, ...]

    @property
    def most(self) -> int:
        return min(u.size for u in self.uses)

    def describe(self) -> str:
        return f"at most {self.most} ({'; '.join(u.describe() for u in self.uses)})"


@dataclass(frozen=True)
class ValueBounds:
    inputs: Mapping[str, IndexBound] = field(default_factory=dict)  # user input -> bound
    dims: Mapping[str, DimLimit] = field(default_factory=dict)  # dim symbol -> limit


def index_bounds(graph: OpGraph) -> ValueBounds:
    """The index bounds of `graph`'s user inputs and the limits of its dynamic dims."""
    gm = graph.program.graph_module
    user = set(graph.inputs)
    by_input: dict[str, list[IndexUse]] = {}
    by_dim: dict[str, list[IndexUse]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for operand, use in _index_operands(node):
            source = _source(operand)
            if source is None:
                continue
            if source.op == "placeholder" and source.name in user:
                if not _is_bool(source):
                    by_input.setdefault(source.name, []).append(use)
            elif source.op == "call_function" and str(source.target) in _ARANGE:
                symbol = _arange_symbol(source)
                if symbol is not None:
                    by_dim.setdefault(symbol, []).append(use)
    return ValueBounds(
        {name: IndexBound(name, tuple(uses)) for name, uses in by_input.items()},
        {sym: DimLimit(sym, tuple(uses)) for sym, uses in by_dim.items()},
    )


def _index_operands(node: fx.Node) -> list[tuple[fx.Node, IndexUse]]:
    """(index operand, what it indexes) for every index argument of `node`."""
    target = str(node.target)
    where = _where(node)
    out: list[tuple[fx.Node, IndexUse]] = []
    if target in _INDEXING:
        pos, dim_pos, negative = _INDEXING[target]
        index = _arg(node, pos)
        dim = 0 if dim_pos is None else _arg(node, dim_pos)
        size = _dim_size(_arg(node, 0), dim) if isinstance(dim, int) else None
        if isinstance(index, fx.Node) and size is not None:
            out.append((index, IndexUse(target, node.name, size, negative, where)))
    elif target in _INDEX_LISTS:
        indices = _arg(node, 1) or ()
        for dim, index in enumerate(indices):
            size = _dim_size(_arg(node, 0), dim)
            if isinstance(index, fx.Node) and size is not None and not _is_bool(index):
                out.append((index, IndexUse(target, node.name, size, True, where)))
    elif target == _TAKE:
        index, table = _arg(node, 1), _arg(node, 0)
        shape = _static_shape(table)
        if isinstance(index, fx.Node) and shape is not None:
            out.append((index, IndexUse(target, node.name, math.prod(shape), True, where)))
    return out


def _source(value: fx.Node) -> fx.Node | None:
    """Where an index operand's elements come from, looking through transparent ops."""
    seen = 0
    while value.op == "call_function" and str(value.target) in _TRANSPARENT:
        src = value.args[0] if value.args else None
        if not isinstance(src, fx.Node) or seen > 64:
            return None
        value, seen = src, seen + 1
    return value


def _arange_symbol(node: fx.Node) -> str | None:
    """The dim symbol `s` of `arange(s)` / `arange(start >= 0, s, step > 0)`, else None."""
    target = str(node.target)
    if target == "aten.arange.default":
        start, end, step = 0, _arg(node, 0), 1
    else:
        start, end = _arg(node, 0), _arg(node, 1)
        step = _arg(node, 2) if target == "aten.arange.start_step" else 1
        step = 1 if step is None else step
    if not (isinstance(start, int) and start >= 0 and isinstance(step, int) and step > 0):
        return None
    val = end.meta.get("val") if isinstance(end, fx.Node) else None
    if isinstance(val, torch.SymInt):
        text = str(val)
        return text if text.isidentifier() else None  # a plain symbol, not "s0 + 1"
    return None


def _arg(node: fx.Node, pos: int):
    return node.args[pos] if len(node.args) > pos else None


def _val(node: object):
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _static_shape(table: object) -> tuple[int, ...] | None:
    val = _val(table)
    if not isinstance(val, torch.Tensor):
        return None
    dims = []
    for s in val.shape:
        if isinstance(s, torch.SymInt):
            if not str(s).isdigit():
                return None
            s = int(str(s))
        dims.append(int(s))
    return tuple(dims)


def _dim_size(table: object, dim: int) -> int | None:
    shape = _static_shape(table)
    if shape is None or not -len(shape) <= dim < len(shape):
        return None
    return shape[dim]


def _is_bool(node: fx.Node) -> bool:
    val = _val(node)
    return isinstance(val, torch.Tensor) and val.dtype == torch.bool


def _where(node: fx.Node) -> str:
    """The op's module (`tok`) and the model's own source line that called it."""
    stack = node.meta.get("nn_module_stack") or {}
    paths = [str(path) for path, _ in stack.values() if path]
    lines = [ln.strip() for ln in (node.meta.get("stack_trace") or "").splitlines()]
    frames = [ln.removeprefix("File ") for ln in lines if ln.startswith("File ")]
    own = [f for f in frames if "/torch/" not in f]
    parts = [f"module {paths[-1]}"] if paths else []
    if own:
        parts.append(own[-1])
    return ", ".join(parts)
