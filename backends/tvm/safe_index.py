"""Every gather, take, index and scatter of a Relax module stays inside its table.

TVM's `take` defaults to mode "fast", which reads wherever an index points (an embedding
lookup with token id 2^24 read far past the table and killed the process), and its
`gather_elements`, `index_tensor`, `index_put` and `scatter_elements` do no check at all.
The ways in validate values before a request runs (interfaces/validation.py), but only
where the graph proves an index came from the caller; a kernel must be memory-safe
whatever reaches it. So, after import:

* every index tensor i of a table of n rows along the indexed axis becomes
  clip(i < 0 ? i + n : i, 0, n - 1) when n is static, clip(i, 0, n - 1) when symbolic
  (and for gather/scatter, which take no negative index in torch).

Valid indices give torch's answers (a negative one counts from the end, as torch's
advanced indexing does); invalid ones give the first or last row, never a read or write
outside the table. Compare, add, select and clamp, no division: TVM fuses them into a
take's loop (computed per element gathered, where a `floor_mod`, TVM's own mode "wrap",
cost 18% on GPT-2's embeddings and the clamp costs nothing measurable); in front of
`gather_elements`, which TVM does not fuse into, they are one pass over the index tensor
(benchmarks/results/safe_gather.md has both).
"""

from __future__ import annotations

from typing import Any

_OPS = ("take", "gather_elements", "index_tensor", "index_put", "scatter_elements")


def safe_indexing(mod: Any) -> Any:
    """`mod` with every indexing op made memory-safe (see the module docstring)."""
    import tvm  # optional (hetero[tvm]): loaded on first use
    from tvm import relax  # optional (hetero[tvm])
    from tvm.relax.expr_functor import PyExprMutator, mutator  # optional (hetero[tvm])

    ops = {tvm.ir.Op.get(f"relax.{name}"): name for name in _OPS}

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or call.op not in ops:
                return call
            name = ops[call.op]
            args = list(call.args)
            data = args[0]
            if name == "take":
                axis = call.attrs.axis
                if axis is None or str(call.attrs.mode) != "fast":
                    return call  # a flattened take, or one that already checks
                args[1] = self._wrap(args[1], _dim(data, int(axis)))
            elif name in ("gather_elements", "scatter_elements"):
                # torch.gather / scatter take no negative index: clamp only
                axis = int(call.attrs.axis)
                args[1] = self._wrap(args[1], _dim(data, axis), negative=False)
            else:  # index_tensor / index_put: one index tensor per leading dim
                indices = _fields(self.builder_, args[1])
                if indices is None:
                    return call
                args[1] = relax.Tuple(
                    [self._wrap(idx, _dim(data, k)) for k, idx in enumerate(indices)]
                )
            return relax.Call(call.op, args, call.attrs, call.ty_args)

        def _wrap(self, index, size, negative: bool = True):
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
                if negative:
                    n = relax.const(size, dtype)
                    below = bb.emit(relax.op.less(index, relax.const(0, dtype)))
                    index = bb.emit(relax.op.where(below, bb.emit(relax.op.add(index, n)), index))
                top = relax.prim_value(size - 1, dtype)
            else:
                top = relax.prim_value(tvm.tirx.Cast(dtype, size - 1))
            return bb.emit(relax.op.clip(index, relax.prim_value(0, dtype), top))

    rewriter = Rewriter()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod


def _dim(data: Any, axis: int) -> Any:
    """The size of `data` along `axis`: an int when static, a PrimExpr when symbolic,
    None when unknown."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

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
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    if isinstance(value, relax.Tuple):
        return list(value.fields)
    ty = value.ty
    if isinstance(ty, relax.TupleType):
        return [bb.emit(relax.TupleGetItem(value, i)) for i in range(len(ty.fields))]
    return None
