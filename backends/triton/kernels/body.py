"""The shared middle of every generated kernel: loads, elementwise ops, reductions, stores.

A template (pointwise, row, matmul) decides the iteration space: which source expression
is the flat index of a 'full' value (and of a 'row' value, for row kernels) and its mask.
`Body` then renders the group's nodes in order, reading outside values through their
strides and writing the group's outputs contiguously.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import Group, dtype, getitem_of, is_tensor, numel, shape
from hetero.backends.triton.kernels.ops import (
    CASTS,
    POINTWISE,
    RESHAPES,
    TL_DTYPE,
    cast,
    compute_type,
    const,
    flat_offset,
)

aten = torch.ops.aten


@dataclass(frozen=True)
class Space:
    """Where a value lives inside the kernel: its flat-index expression and mask.

    `fast`: the address of an operand whose IN{i}_C flag says it is laid out in the order the
    kernel walks (default: `idx`, row-major). A kernel walking a channels-last tensor in
    memory order sets it to that order's index while `idx` stays the logical one.
    """

    idx: str
    mask: str | None
    fast: str | None = None


@dataclass(frozen=True)
class Operand:
    """A tensor the kernel reads, as the consumer's shape sees it (after broadcasting)."""

    value: Node
    shape: tuple[int, ...]
    arg: str  # pointer argument name


@dataclass(frozen=True)
class Output:
    value: Node
    arg: str


# (shape, stride args) -> a cheaper address than flat_offset, where the template knows one
Direct = Callable[[tuple[int, ...], Sequence[str]], "str | None"]


class Body:
    def __init__(self, group: Group, spaces: dict[str, Space], space_of: Callable[[Node], str],
                 direct: Direct | None = None) -> None:  # fmt: skip
        self.group = group
        self.members = set(group.nodes)
        self.spaces = spaces
        self.space_of = space_of
        self.direct = direct
        self.lines: list[str] = []
        self.operands: list[Operand] = []
        self.var: dict[Node, str] = {}
        self._loaded: dict[tuple[Node, tuple[int, ...], str], str] = {}
        self._n = 0

    def fresh(self, prefix: str = "t") -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def emit(self, line: str) -> None:
        self.lines.append(line)

    # ---- reading ---------------------------------------------------------------------------
    def load(self, value: Node, as_shape: tuple[int, ...], space: str) -> str:
        key = (value, as_shape, space)
        if key in self._loaded:
            return self._loaded[key]
        i = len(self.operands)
        op = Operand(value, as_shape, f"in{i}")
        self.operands.append(op)
        strides = [f"in{i}_s{d}" for d in range(len(as_shape))]
        sp = self.spaces[space]
        off = (self.direct(as_shape, strides) if self.direct else None) or flat_offset(
            sp.idx, as_shape, strides
        )
        v = self.fresh("x")
        ct = compute_type(dtype(value))
        if off == "0":
            self.emit(f"{v} = tl.load(in{i}).to({ct})")
        else:
            self.emit(f"if IN{i}_C:")
            self.emit(f"    o{i} = {sp.fast or sp.idx}")
            self.emit("else:")
            self.emit(f"    o{i} = {off}")
            mask = f", mask={sp.mask}, other=0" if sp.mask else ""
            self.emit(f"{v} = tl.load(in{i} + o{i}{mask}).to({ct})")
        self._loaded[key] = v
        return v

    def arg(self, a: object, consumer: Node) -> str:
        """Source for argument `a` of `consumer`: a member's variable, a load, or a constant."""
        if isinstance(a, Node):
            if a in self.var:
                return self.var[a]
            return self.load(a, shape(consumer), self.space_of(consumer))
        if a is None:
            return "None"
        return const(a)

    # ---- computing -------------------------------------------------------------------------
    def pointwise(self, node: Node) -> None:
        gi = getitem_of(node)
        if gi is not None:
            self.var[node] = self.var[gi[0]][gi[1]]  # type: ignore[index]
            return
        src = node.args[0]
        if node.target in RESHAPES or node.target in CASTS:
            x = self.arg(src, node)
            if dtype(src) != dtype(node):
                x = cast(x, dtype(src), dtype(node))
            self.var[node] = x
            return
        render = POINTWISE[node.target]
        args = [self.arg(a, node) for a in node.args]
        kw = dict(node.kwargs)
        out = self.fresh()
        expr = render(args, kw)
        ins = [a for a in node.args if isinstance(a, Node)]
        # Comparisons and logic give bool; everything else is computed in the node's type.
        if dtype(node) == torch.bool:
            self.emit(f"{out} = {expr}")
        else:
            if any(dtype(a) != dtype(node) for a in ins):
                expr = f"({expr}).to({compute_type(dtype(node))})"
            self.emit(f"{out} = {expr}")
        self.var[node] = out

    def row_reduce(self, node: Node, cmask: str, n_cols: int) -> None:
        """A reduction over the row (last dim): the result is one value per row."""
        src = node.args[0]
        x = self.var[src] if src in self.var else self.load(src, shape(src), "full")
        t = node.target
        out = self.fresh()
        if t in (aten.sum.dim_IntList, aten.mean.dim):
            self.emit(f"{out} = tl.reduce(tl.where({cmask}, {x}, 0.0), 0, _SUM)")
            if t is aten.mean.dim:
                self.emit(f"{out} = {out} / {n_cols}.0")
        elif t in (aten.amax.default, aten.amin.default):
            big = t is aten.amax.default
            fn, fill = ("_MAX", "float('-inf')") if big else ("_MIN", "float('inf')")
            self.emit(f"{out} = tl.reduce(tl.where({cmask}, {x}, {fill}), 0, {fn})")
        elif t in (aten._softmax.default, aten._log_softmax.default):
            mx, e, s = self.fresh(), self.fresh(), self.fresh()
            self.emit(f"{mx} = tl.reduce(tl.where({cmask}, {x}, float('-inf')), 0, _MAX)")
            self.emit(f"{e} = tl.where({cmask}, tl.exp({x} - {mx}), 0.0)")
            self.emit(f"{s} = tl.reduce({e}, 0, _SUM)")
            if t is aten._softmax.default:
                self.emit(f"{out} = {e} / {s}")
            else:
                self.emit(f"{out} = ({x} - {mx}) - tl.log({s})")
        elif t is aten.native_layer_norm.default:
            _, _, w, b, eps = node.args
            mean, xc, var, rstd = self.fresh(), self.fresh(), self.fresh(), self.fresh()
            self.emit(f"{mean} = tl.reduce(tl.where({cmask}, {x}, 0.0), 0, _SUM) / {n_cols}.0")
            self.emit(f"{xc} = tl.where({cmask}, {x} - {mean}, 0.0)")
            self.emit(f"{var} = tl.reduce({xc} * {xc}, 0, _SUM) / {n_cols}.0")
            self.emit(f"{rstd} = tl.rsqrt({var} + {const(float(eps))})")
            y = f"{xc} * {rstd}"
            if w is not None:
                y = f"{y} * {self.load(w, shape(src), 'full')}"
            if b is not None:
                y = f"{y} + {self.load(b, shape(src), 'full')}"
            self.emit(f"{out} = {y}")
            self.var[node] = (out, mean, rstd)  # type: ignore[assignment]
            return
        else:  # pragma: no cover - guarded by the Reduction rule
            raise NotImplementedError(str(t))
        self.var[node] = out

    # ---- writing ---------------------------------------------------------------------------
    def stores(self, walk_order: Callable[[Node], bool] | None = None) -> list[Output]:
        """Store every output at its logical index, or where `walk_order(node)` says so, at
        the walking order's index (`fast`: the output is allocated in that layout)."""
        outs = []
        for j, node in enumerate(self.group.outputs):
            arg = f"out{j}"
            sp = self.spaces[self.space_of(node)]
            v = self.var[node]
            mask = f", mask={sp.mask}" if sp.mask else ""
            at = sp.fast if walk_order is not None and sp.fast and walk_order(node) else sp.idx
            self.emit(f"tl.store({arg} + {at}, ({v}).to({TL_DTYPE[dtype(node)]}){mask})")
            outs.append(Output(node, arg))
        return outs


def indent(lines: Sequence[str], n: int = 4) -> str:
    pad = " " * n
    return "\n".join(pad + ln for ln in lines)


def operand_sig(ops: Sequence[Operand], outs: Sequence[Output]) -> tuple[str, str, str]:
    """(pointer args, stride args, contiguity flags) for a kernel signature."""
    ptrs = ", ".join([o.arg for o in ops] + [o.arg for o in outs])
    strides = ", ".join(f"{o.arg}_s{d}" for o in ops for d in range(len(o.shape)))
    flags = ", ".join(f"IN{i}_C: tl.constexpr" for i, _ in enumerate(ops))
    return ptrs, strides, flags


def launch_prelude(ops: Sequence[Operand], outs: Sequence[Output]) -> list[str]:
    """Launcher lines: allocate outputs, derive strides and contiguity of each operand."""
    lines = []
    for o in outs:
        lines.append(
            f"{o.arg} = torch.empty({tuple(shape(o.value))}, dtype={dtype(o.value)}, device=dev)"
        )
    return lines


def launch_args(ops: Sequence[Operand], outs: Sequence[Output], names: Sequence[str],
                contig: str = "_contig") -> tuple[str, str, str]:  # fmt: skip
    """(pointer args, stride args, flag kwargs) as launcher source; `names` are the operands'
    launcher parameter names; `contig(t, shape)` is the launcher expression that says an
    operand is laid out in the kernel's walking order."""
    ptrs = ", ".join(list(names) + [o.arg for o in outs])
    strides = ", ".join(f"*_bstrides({n}, {o.shape})" for n, o in zip(names, ops, strict=True))
    flags = ", ".join(
        f"IN{i}_C={contig}({n}, {o.shape})" for i, (n, o) in enumerate(zip(names, ops, strict=True))
    )
    return ptrs, strides, flags


def numel_of(n: Node) -> int:
    return numel(n) if is_tensor(n) else 0
