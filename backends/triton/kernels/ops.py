"""Pointwise ATen ops as Triton expressions, and the address arithmetic every template shares.

Every fused kernel computes its values at a flat, row-major index of the value's logical
shape; an operand is read through its (broadcast) strides, so any layout works. Values
of floating type are held in float32 inside a kernel and rounded once at the store.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence

import torch

aten = torch.ops.aten

# torch dtype -> Triton type name, for casts and stores.
TL_DTYPE = {
    torch.float16: "tl.float16",
    torch.bfloat16: "tl.bfloat16",
    torch.float32: "tl.float32",
    torch.float64: "tl.float64",
    torch.int8: "tl.int8",
    torch.int16: "tl.int16",
    torch.int32: "tl.int32",
    torch.int64: "tl.int64",
    torch.uint8: "tl.uint8",
    torch.bool: "tl.int1",
}


def compute_type(dtype: torch.dtype) -> str:
    """The type a value of `dtype` is held in while a kernel computes."""
    if dtype.is_floating_point:
        return "tl.float64" if dtype == torch.float64 else "tl.float32"
    return TL_DTYPE[dtype]


def dot_upcast(dtype: torch.dtype | None) -> str:
    """A suffix for tl.dot operands. Triton's interpreter (3.9) multiplies bfloat16 tiles as
    raw bits; there they are upcast to float32 first, which gives what the GPU computes
    (exact bfloat16 products accumulated in float32). On the GPU: nothing."""
    if dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
        return ".to(tl.float32)"
    return ""


def const(v: object) -> str:
    """A Python scalar as Triton source."""
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, float):
        if math.isinf(v):
            return "float('inf')" if v > 0 else "float('-inf')"
        if math.isnan(v):
            return "float('nan')"
        return repr(v)
    if isinstance(v, int):
        return str(v)
    raise TypeError(f"no Triton constant for {v!r}")


Render = Callable[[Sequence[str], dict], str]

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _tanh(x: str) -> str:
    # 1 - 2/(exp(2x)+1) is exact at both infinities and needs no libdevice (the interpreter
    # lacks some libdevice functions).
    return f"(1.0 - 2.0 / (tl.exp(2.0 * {x}) + 1.0))"


def _gelu(a: Sequence[str], kw: dict) -> str:
    x = a[0]
    if kw.get("approximate", "none") == "tanh":
        inner = f"({_SQRT_2_OVER_PI!r} * ({x} + 0.044715 * {x} * {x} * {x}))"
        return f"(0.5 * {x} * (1.0 + {_tanh(inner)}))"
    return f"(0.5 * {x} * (1.0 + tl.erf({x} * {1 / math.sqrt(2.0)!r})))"


def _pow(a: Sequence[str], kw: dict) -> str:
    x, e = a
    small = {"2.0": f"({x} * {x})", "2": f"({x} * {x})", "3.0": f"({x} * {x} * {x})",
             "3": f"({x} * {x} * {x})", "0.5": f"tl.sqrt({x})", "1.0": x, "1": x,
             "-1.0": f"(1.0 / {x})", "-0.5": f"tl.rsqrt({x})"}  # fmt: skip
    if e in small:
        return small[e]
    return f"tl.exp({e} * tl.log({x}))"


def _add(a: Sequence[str], kw: dict) -> str:
    alpha = kw.get("alpha", 1)
    return f"({a[0]} + {a[1]})" if alpha == 1 else f"({a[0]} + {const(alpha)} * {a[1]})"


def _sub(a: Sequence[str], kw: dict) -> str:
    alpha = kw.get("alpha", 1)
    return f"({a[0]} - {a[1]})" if alpha == 1 else f"({a[0]} - {const(alpha)} * {a[1]})"


def _div(a: Sequence[str], kw: dict) -> str:
    mode = kw.get("rounding_mode")
    if mode is None:
        return f"({a[0]} / {a[1]})"
    if mode == "floor":
        return f"tl.floor({a[0]} / {a[1]})"
    return f"({a[0]} // {a[1]})"


def _clamp(a: Sequence[str], kw: dict) -> str:
    x, lo, hi = [*a, "None", "None"][:3]
    if lo != "None":
        x = f"tl.maximum({x}, {lo})"
    if hi != "None":
        x = f"tl.minimum({x}, {hi})"
    return x


def _unary(fmt: str) -> Render:
    return lambda a, kw: fmt.format(*a)


# ATen overload -> how to render it from its rendered arguments (tensors and scalars in
# schema order) and keyword arguments. Casts are handled by the caller (they need dtypes).
POINTWISE: dict[object, Render] = {
    aten.add.Tensor: _add,
    aten.add.Scalar: _add,
    aten.sub.Tensor: _sub,
    aten.sub.Scalar: _sub,
    aten.rsub.Scalar: lambda a, kw: f"({a[1]} - {a[0]})",
    aten.mul.Tensor: _unary("({0} * {1})"),
    aten.mul.Scalar: _unary("({0} * {1})"),
    aten.div.Tensor: _div,
    aten.div.Scalar: _div,
    aten.div.Tensor_mode: _div,
    aten.neg.default: _unary("(-{0})"),
    aten.abs.default: _unary("tl.abs({0})"),
    aten.exp.default: _unary("tl.exp({0})"),
    aten.log.default: _unary("tl.log({0})"),
    aten.sqrt.default: _unary("tl.sqrt({0})"),
    aten.rsqrt.default: _unary("tl.rsqrt({0})"),
    aten.reciprocal.default: _unary("(1.0 / {0})"),
    aten.sin.default: _unary("tl.sin({0})"),
    aten.cos.default: _unary("tl.cos({0})"),
    aten.tanh.default: lambda a, kw: _tanh(a[0]),
    aten.erf.default: _unary("tl.erf({0})"),
    aten.sigmoid.default: _unary("(1.0 / (1.0 + tl.exp(-{0})))"),
    aten.relu.default: _unary("tl.maximum({0}, 0.0)"),
    aten.silu.default: _unary("({0} / (1.0 + tl.exp(-{0})))"),
    aten.gelu.default: _gelu,
    aten.pow.Tensor_Scalar: _pow,
    aten.maximum.default: _unary("tl.maximum({0}, {1})"),
    aten.minimum.default: _unary("tl.minimum({0}, {1})"),
    aten.clamp.default: _clamp,
    aten.hardtanh.default: lambda a, kw: _clamp([a[0], *(a[1:] or ["-1.0", "1.0"])], kw),
    aten.hardsigmoid.default: _unary("tl.minimum(tl.maximum({0} / 6.0 + 0.5, 0.0), 1.0)"),
    aten.hardswish.default: _unary("({0} * tl.minimum(tl.maximum({0} + 3.0, 0.0), 6.0) / 6.0)"),
    aten.leaky_relu.default: lambda a, kw: (
        f"tl.where({a[0]} > 0, {a[0]}, {a[0]} * {a[1] if len(a) > 1 else '0.01'})"
    ),
    aten.where.self: _unary("tl.where({0}, {1}, {2})"),
    aten.eq.Tensor: _unary("({0} == {1})"),
    aten.eq.Scalar: _unary("({0} == {1})"),
    aten.ne.Tensor: _unary("({0} != {1})"),
    aten.ne.Scalar: _unary("({0} != {1})"),
    aten.lt.Tensor: _unary("({0} < {1})"),
    aten.lt.Scalar: _unary("({0} < {1})"),
    aten.le.Tensor: _unary("({0} <= {1})"),
    aten.le.Scalar: _unary("({0} <= {1})"),
    aten.gt.Tensor: _unary("({0} > {1})"),
    aten.gt.Scalar: _unary("({0} > {1})"),
    aten.ge.Tensor: _unary("({0} >= {1})"),
    aten.ge.Scalar: _unary("({0} >= {1})"),
    aten.bitwise_and.Tensor: _unary("({0} & {1})"),
    aten.bitwise_or.Tensor: _unary("({0} | {1})"),
    aten.bitwise_not.default: _unary("(~{0})"),
    aten.logical_and.default: _unary("({0} & {1})"),
    aten.logical_or.default: _unary("({0} | {1})"),
    aten.logical_not.default: _unary("({0} == 0)"),
}

# Ops that change no value: a cast (its dtype comes from the node), a copy, or a reshape
# (values are addressed by their flat row-major index, which a reshape keeps).
CASTS = {aten._to_copy.default, aten.clone.default, aten.alias.default}
RESHAPES = {
    aten.view.default,
    aten._unsafe_view.default,
    aten.reshape.default,
    aten.squeeze.dim,
    aten.squeeze.dims,
    aten.squeeze.default,
    aten.unsqueeze.default,
}


def cast(expr: str, src: torch.dtype, dst: torch.dtype) -> str:
    """A value held in compute_type(src) converted as torch would convert src -> dst."""
    if dst == torch.bool:
        return f"({expr} != 0)"
    if dst.is_floating_point and src.is_floating_point:
        if dst.itemsize < 4 and dst.itemsize < src.itemsize:  # round like eager does
            return f"{expr}.to({TL_DTYPE[dst]}).to({compute_type(dst)})"
        return f"{expr}.to({compute_type(dst)})"
    return f"{expr}.to({compute_type(dst)})"


def flat_offset(idx: str, shape: Sequence[int], stride_args: Sequence[str]) -> str:
    """Address of flat row-major element `idx` of `shape`, read through `stride_args`."""
    terms, inner = [], 1
    dims = [(d, s) for d, s in enumerate(shape) if s != 1]
    for pos, (d, size) in enumerate(reversed(dims)):
        q = idx if inner == 1 else f"({idx} // {inner})"
        last = pos == len(dims) - 1
        term = q if last else f"({q} % {size})"
        terms.append(f"{term} * {stride_args[d]}")
        inner *= size
    return " + ".join(terms) if terms else "0"


def broadcast_strides(t: torch.Tensor, shape: Sequence[int]) -> tuple[int, ...]:
    """t's strides seen as a tensor of `shape` (0 along broadcast dims)."""
    if tuple(t.shape) == tuple(shape):
        return tuple(t.stride())
    return tuple(t.expand(tuple(shape)).stride())


def contiguous_for(t: torch.Tensor, shape: Sequence[int]) -> bool:
    """Whether element i of `shape` sits at offset i in t."""
    return tuple(t.shape) == tuple(shape) and t.is_contiguous()
