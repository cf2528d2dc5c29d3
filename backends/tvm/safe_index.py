"""Every gather, take, index and scatter of a Relax module stays inside its table.

TVM's `take` defaults to mode "fast", which reads wherever an index points (an embedding
lookup with token id 2^24 read far past the table and killed the process), and its
`gather_elements`, `index_tensor`, `index_put` and `scatter_elements` do no check at all.
The ways in validate values before a request runs (interfaces/validation.py), but only
where the graph proves an index came from the caller; a kernel must be memory-safe
whatever reaches it. So, after import:

* `take` runs in mode "wrap": an index in [-n, n) means what it means in torch (negative
  ones count from the end), anything else lands inside the table;
* the index tensors of the other four become `floor_mod(index, n)` (the same wrap) when
  the table's size n along that axis is static, else `clip(index, 0, n - 1)`.

Valid indices give torch's answers; invalid ones give some row of the table, never a read
or write outside it. The cost is one integer op per index, not per element gathered
(benchmarks/safe_gather.py measures it).
"""

from __future__ import annotations

from typing import Any

_OPS = ("take", "gather_elements", "index_tensor", "index_put", "scatter_elements")


def safe_indexing(mod: Any) -> Any:
    """`mod` with every indexing op made memory-safe (see the module docstring)."""
    import tvm
    from tvm import relax
    from tvm.relax.expr_functor import PyExprMutator, mutator

    ops = {tvm.ir.Op.get(f"relax.{name}"): name for name in _OPS}

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or call.op not in ops:
                return call
            name = ops[call.op]
            args = list(call.args)
            if name == "take":
                if str(call.attrs.mode) != "fast":
                    return call
                axis = call.attrs.axis
                return relax.op.take(args[0], args[1], None if axis is None else int(axis), "wrap")
            data = args[0]
            if name in ("gather_elements", "scatter_elements"):
                axis = int(call.attrs.axis)
                args[1] = self._wrap(args[1], _dim(data, axis))
            else:  # index_tensor / index_put: one index tensor per leading dim
                indices = _fields(self.builder_, args[1])
                if indices is None:
                    return call
                args[1] = relax.Tuple(
                    [self._wrap(idx, _dim(data, k)) for k, idx in enumerate(indices)]
                )
            return relax.Call(call.op, args, call.attrs, call.ty_args)

        def _wrap(self, index, size):
            ty = index.ty
            if size is None or not isinstance(ty, relax.TensorType):
                return index
            dtype = str(ty.dtype)
            if dtype == "bool" or not dtype.startswith(("int", "uint")):
                return index  # a mask, not positions
            bb = self.builder_
            if isinstance(size, int):
                if size <= 0:
                    return index
                return bb.emit(relax.op.floor_mod(index, relax.const(size, dtype)))
            low = relax.PrimValue(tvm.tir.IntImm(dtype, 0))
            high = relax.PrimValue(tvm.tir.Cast(dtype, size - 1))
            return bb.emit(relax.op.clip(index, low, high))

    rewriter = Rewriter()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod


def _dim(data: Any, axis: int) -> Any:
    """The size of `data` along `axis`: an int when static, a PrimExpr when symbolic,
    None when unknown."""
    from tvm import relax

    ty = data.ty
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = list(ty.shape)
    if not -len(shape) <= axis < len(shape):
        return None
    size = shape[axis]
    return int(size.value) if hasattr(size, "value") else size


def _fields(bb: Any, value: Any) -> list[Any] | None:
    """The tensors of a tuple-valued argument (a literal tuple or a tuple variable)."""
    from tvm import relax

    if isinstance(value, relax.Tuple):
        return list(value.fields)
    ty = value.ty
    if isinstance(ty, relax.TupleType):
        return [bb.emit(relax.TupleGetItem(value, i)) for i in range(len(ty.fields))]
    return None
