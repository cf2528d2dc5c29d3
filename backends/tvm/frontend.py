"""Partition -> Relax: torch.export of the unit, then TVM's ExportedProgram importer, amended.

TVM 0.27's importer has two gaps we close through its own extension point (a subclass
whose `create_convert_map` returns amended converters), not with model-specific patches:

* Dtypes. Its matmul-family converters (mm, bmm, matmul, addmm, baddbmm, linear) compute in
  a hard-coded float32, so a float16 Linear fails ("Binary operators must have the same
  datatype": an fp16 bias added to the fp32 product). We convert those ops in the dtype
  torch recorded for the node, and every converter's result is cast to the dtype torch
  recorded (`node.meta["val"]`) whenever the two differ, so no other converter that assumes
  float32 can leak a wrong dtype into the next op.
* Attention. `aten.scaled_dot_product_attention` stays one node in captured graphs; the
  stock converter ignores `scale`, rejects boolean masks and grouped-query attention. We
  lower it to matmul -> scale -> mask -> softmax -> matmul in Relax, which TVM fuses (and
  whose matmuls the CPU dispatch sends to BLAS).

`unsupported(node)` answers, per op, whether this importer can convert it; the backend's
`supports` builds on it so that what cannot convert is placed elsewhere, never crashed on.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

import torch
from torch import fx

from hetero.backends.base import CompileUnit
from hetero.backends.export import export_unit
from hetero.backends.tvm.safe_index import safe_indexing as make_safe
from hetero.partitioner.graph import decomposition_table


def _torch_dtype_name(val: Any) -> str | None:
    if isinstance(val, torch.Tensor):
        return str(val.dtype).removeprefix("torch.")
    return None


# Ops TVM refuses in bfloat16 (layer_norm takes float32 or float16 alone, "power only applies
# to float"; a bfloat16 GPT-2 or BERT did not build): converted in float32, as torch's
# bfloat16 kernels accumulate, the result rounded back
_REFUSED_IN_BFLOAT16 = (
    "native_layer_norm.default",
    "pow.Tensor_Scalar",
    "pow.Tensor_Tensor",
    "pow.Scalar",
)
# Accumulations over bool/int input: torch accumulates in its output dtype (int64 for bool);
# TVM would accumulate in the input's, and LLVM has no bool add.
_ACCUMULATIONS = (
    "cumsum.default",
    "cumprod.default",
    "sum.default",
    "sum.dim_IntList",
    "prod.default",
    "prod.dim_int",
    "mean.default",
    "mean.dim",
)


def _wrap(table: dict, keys: tuple[str, ...], wrapper: Any) -> None:
    """Each converter of `keys` that `table` has, through `wrapper`."""
    for key in keys:
        if key in table:
            table[key] = wrapper(table[key])


@functools.cache
def _importer_class():
    """The amended importer class (built lazily: importing TVM costs a second)."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.frontend.torch.exported_program_translator import ExportedProgramImporter

    class Importer(ExportedProgramImporter):
        def create_convert_map(self):
            table = super().create_convert_map()
            table.update(
                {
                    "mm.default": self._mm_like,
                    "bmm.default": self._mm_like,
                    "matmul.default": self._mm_like,
                    "addmm.default": self._addmm_typed,
                    "baddbmm.default": self._addmm_typed,
                    "linear.default": self._linear_typed,
                    "scaled_dot_product_attention.default": self._sdpa,
                }
            )
            _wrap(table, _REFUSED_IN_BFLOAT16, self._bfloat16_in_float32)
            _wrap(table, ("native_layer_norm.default",), self._with_stats)
            _wrap(table, _ACCUMULATIONS, self._accumulate_in_out_dtype)
            return {k: self._reconcile(v) for k, v in table.items()}

        def _with_stats(self, convert):
            """native_layer_norm returns (out, mean, rstd); the stock converter returns `out`
            alone and `getitem` of 1 or 2 silently yields `out` again. Unused statistics are
            removed by dead-code elimination."""

            def run(node: fx.Node):
                out = convert(node)
                bb = self.block_builder
                x = self.env[node.args[0]]
                ndims = len(node.args[1])
                eps = node.args[4] if len(node.args) > 4 else 1e-5
                axes = list(range(-ndims, 0))
                vals = node.meta.get("val") or (None, None, None)
                want = _torch_dtype_name(vals[1]) or str(x.ty.dtype)
                # torch accumulates half-precision statistics in float32, then rounds.
                xs = x if str(x.ty.dtype) == "float32" else bb.emit(relax.op.astype(x, "float32"))
                mean = bb.emit(relax.op.mean(xs, axes, keepdims=True))
                var = bb.emit(relax.op.variance(xs, axes, keepdims=True))
                rstd = bb.emit(relax.op.rsqrt(relax.op.add(var, relax.const(eps, "float32"))))
                if want != "float32":
                    mean = bb.emit(relax.op.astype(mean, want))
                    rstd = bb.emit(relax.op.astype(rstd, want))
                return (out, mean, rstd)

            return run

        def _bfloat16_in_float32(self, convert):
            """`convert` with its node's bfloat16 tensor arguments cast to float32 and the
            result cast back to bfloat16 (as it was where none is bfloat16)."""

            def run(node: fx.Node):
                bb = self.block_builder
                saved = {
                    a: self.env[a]
                    for a in node.args
                    if isinstance(a, fx.Node)
                    and str(getattr(getattr(self.env.get(a), "ty", None), "dtype", ""))
                    == "bfloat16"
                }
                if not saved:
                    return convert(node)
                for a, v in saved.items():
                    self.env[a] = bb.emit(relax.op.astype(v, "float32"))
                try:
                    out = convert(node)
                finally:
                    self.env.update(saved)
                return bb.emit(relax.op.astype(out, "bfloat16"))

            return run

        def _accumulate_in_out_dtype(self, convert):
            def run(node: fx.Node):
                src = node.args[0]
                want = _torch_dtype_name(node.meta.get("val"))
                x = self.env.get(src) if isinstance(src, fx.Node) else None
                have = str(getattr(getattr(x, "ty", None), "dtype", ""))
                if x is None or want is None or have == want or have == "":
                    return convert(node)
                self.env[src] = self.block_builder.emit(relax.op.astype(x, want))
                try:
                    return convert(node)
                finally:
                    self.env[src] = x

            return run

        # ---- dtype reconciliation ---------------------------------------------------------
        def _reconcile(self, convert):
            def run(node: fx.Node):
                out = convert(node)
                want = _torch_dtype_name(node.meta.get("val"))
                if want is None or not isinstance(out, relax.Expr):
                    return out
                ty = getattr(out, "ty", None)
                have = getattr(ty, "dtype", None)
                if isinstance(ty, relax.TensorType) and have is not None and str(have) != want:
                    if str(have) in ("", "void"):
                        return out
                    return self.block_builder.emit(relax.op.astype(out, want))
                return out

            return run

        def _out_dtype(self, node: fx.Node, fallback) -> str:
            return _torch_dtype_name(node.meta.get("val")) or str(fallback.ty.dtype)

        # ---- matmul family in the node's own dtype -----------------------------------------
        def _mm_like(self, node: fx.Node):
            a, b = self.env[node.args[0]], self.env[node.args[1]]
            return self.block_builder.emit(
                relax.op.matmul(a, b, out_dtype=self._out_dtype(node, a))
            )

        def _addmm_typed(self, node: fx.Node):
            bias, a, b = (self.env[x] for x in node.args[:3])
            beta = node.kwargs.get("beta", 1)
            alpha = node.kwargs.get("alpha", 1)
            dtype = self._out_dtype(node, a)
            bb = self.block_builder
            res = bb.emit(relax.op.matmul(a, b, out_dtype=dtype))
            if alpha != 1:
                res = bb.emit(relax.op.multiply(res, relax.const(alpha, dtype)))
            if beta == 0:
                return res
            if str(bias.ty.dtype) != dtype:
                bias = bb.emit(relax.op.astype(bias, dtype))
            if beta != 1:
                bias = bb.emit(relax.op.multiply(bias, relax.const(beta, dtype)))
            return bb.emit(relax.op.add(res, bias))

        def _linear_typed(self, node: fx.Node):
            x, w = self.env[node.args[0]], self.env[node.args[1]]
            bias = (
                self.env[node.args[2]] if len(node.args) > 2 and node.args[2] is not None else None
            )
            dtype = self._out_dtype(node, x)
            bb = self.block_builder
            res = bb.emit(
                relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0])), out_dtype=dtype)
            )
            if bias is not None:
                res = bb.emit(relax.op.add(res, bias))
            return res

        # ---- attention ------------------------------------------------------------------------
        def _sdpa(self, node: fx.Node):
            bb = self.block_builder
            q, k, v = (self.env[x] for x in node.args[:3])
            arg = _sdpa_args(node)
            dtype = str(q.ty.dtype)
            nd = len(q.ty.shape)
            if arg["enable_gqa"]:
                hq, hk = int(q.ty.shape[-3]), int(k.ty.shape[-3])
                if hq != hk:
                    k = bb.emit(relax.op.repeat(k, hq // hk, axis=nd - 3))
                    v = bb.emit(relax.op.repeat(v, hq // hk, axis=nd - 3))
            axes = [*range(nd - 2), nd - 1, nd - 2]
            kt = bb.emit(relax.op.permute_dims(k, axes))
            scores = bb.emit(relax.op.matmul(q, kt, out_dtype=dtype))
            scale = arg["scale"]
            if scale is None:
                scale = 1.0 / math.sqrt(int(q.ty.shape[-1]))
            scores = bb.emit(relax.op.multiply(scores, relax.const(scale, dtype)))
            neg_inf = relax.const(float("-inf"), dtype)
            mask = arg["attn_mask"]
            if mask is not None:
                m = self.env[mask]
                if str(m.ty.dtype) == "bool":
                    scores = bb.emit(relax.op.where(m, scores, neg_inf))
                else:
                    if str(m.ty.dtype) != dtype:
                        m = bb.emit(relax.op.astype(m, dtype))
                    scores = bb.emit(relax.op.add(scores, m))
            if arg["is_causal"]:
                L, S = q.ty.shape[-2], k.ty.shape[-2]
                ones = bb.emit(relax.op.ones(relax.ShapeExpr([L, S]), "bool"))
                keep = bb.emit(relax.op.tril(ones, 0))
                scores = bb.emit(relax.op.where(keep, scores, neg_inf))
            probs = bb.emit(relax.op.nn.softmax(scores, axis=-1))
            return bb.emit(relax.op.matmul(probs, v, out_dtype=dtype))

    return Importer


_SDPA_ARGS = ("attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = {
    "attn_mask": None,
    "dropout_p": 0.0,
    "is_causal": False,
    "scale": None,
    "enable_gqa": False,
}


def _sdpa_args(node: fx.Node) -> dict[str, Any]:
    out = dict(_SDPA_DEFAULTS)
    out.update(zip(_SDPA_ARGS, node.args[3:], strict=False))
    out.update({k: v for k, v in node.kwargs.items() if k in out})
    return out


@functools.cache
def converter_names() -> frozenset[str]:
    """The aten overload names (e.g. 'addmm.default') the amended importer converts."""
    return frozenset(k for k in _importer_class()().convert_map if isinstance(k, str))


def op_key(target: str) -> str:
    """'aten.addmm.default' -> 'addmm.default' (the importer's key); 'getitem' stays, and
    '<built-in function mul>' (size arithmetic of a dynamic graph) is the importer's 'mul'."""
    if target.startswith("<built-in function ") and target.endswith(">"):
        return target.removeprefix("<built-in function ").removesuffix(">")
    return target.removeprefix("aten.")


def unsupported_reason(target: str, node: fx.Node | None = None) -> str:
    """'' when the importer converts this op (with these arguments), else why not."""
    key = op_key(target)
    if key not in converter_names():
        return f"TVM's Relax importer has no converter for {target}"
    sdpa = key == "scaled_dot_product_attention.default"
    if sdpa and node is not None and _sdpa_args(node)["dropout_p"]:
        return "scaled_dot_product_attention with dropout has no TVM lowering"
    return ""


def to_relax(unit: CompileUnit, dtype: torch.dtype | None = None, *, safe_indexing: bool = True):
    """(IRModule with `main(*activations)` returning a flat tuple, the outputs' pytree spec).

    Parameters are bound as constants (see backend.py for why). Raises ValueError listing
    every op the importer cannot convert, before converting anything. Every gather, take,
    index and scatter is made memory-safe (safe_index.py); `safe_indexing=False` exists
    only for the benchmark that measures what that costs.
    """
    # Sizes handed over from another partition become (n, 0) tensors: the importer takes
    # tensors only, and a dim is where it expects a symbolic size.
    ep = export_unit(unit, dtype, carry_sizes=True)
    # hetero's own decompositions: core ATen but SDPA kept whole (TVM's default would split it).
    table = decomposition_table()
    if not _decomposed(ep, table) or _unconvertible(ep):
        ep = ep.run_decompositions(table)
    bad = _unconvertible(ep)
    if bad:
        raise ValueError("cannot convert to Relax:\n  " + "\n  ".join(bad))
    mod = _importer_class()().from_exported_program(ep, False, False, False, None)
    if safe_indexing:
        mod = make_safe(mod)
    return mod, ep.call_spec.out_spec


def _unconvertible(ep: torch.export.ExportedProgram) -> list[str]:
    """'node: why' for each op of `ep` the importer cannot convert."""
    bad = []
    for n in ep.graph.nodes:
        if n.op != "call_function":
            continue
        target = str(n.target) if hasattr(n.target, "_opname") else n.target.__name__
        why = unsupported_reason(target, n)
        if why:
            bad.append(f"{n.name}: {why}")
    return bad


def _decomposed(ep: torch.export.ExportedProgram, table: dict) -> bool:
    """Whether `run_decompositions(table)` would leave `ep`'s ops as they are: every op an
    ATen overload the table keeps and that changes nothing in place (no higher-order op, no
    size arithmetic). A partition re-exported from a captured graph is such a program (its
    ops came through the same table): decomposing it only traced it again, 2.0 s of a 6 s
    TVM compile of GPT-2 small, to drop the `getitem`s of outputs nothing reads (50 of 598
    nodes), which Relax's own dead-code pass removes."""
    for n in ep.graph.nodes:
        if n.op != "call_function" or n.target is operator.getitem:
            continue
        op = n.target
        if not isinstance(op, torch._ops.OpOverload) or op in table or op._schema.is_mutable:
            return False
    return True
