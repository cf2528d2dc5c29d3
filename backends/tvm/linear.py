"""Offload large Linear layers with their epilogues to oneDNN (TVM's BYOC-DNNL idea).

A Linear in Relax, after FoldConstant, is `matmul(x, W^T const)` followed by a bias add,
often reshapes, and then either an activation (GELU, ReLU) or a residual add. Each such
chain becomes one call of torch's oneDNN `mkldnn._linear_pointwise` (what inductor's CPU
freezing path uses), bias and epilogue applied as post-ops while the output tile is in
cache, through a TVM FFI function (registered by `kernels.register_kernels`) that returns
torch's output to the VM without a copy. Where torch was built without oneDNN the function
falls back to `F.linear` plus the epilogue: slower, same result.

Measured on the 2-core AMD EPYC development host (quiet, fastest of 25): for the MLP
block's 1024x256x1024 and 1024x1024x256 products oneDNN took 7.7-7.9 ms against MKL's
7.9-8.2, the residual-add post-op came free and the erf-GELU one cost what TVM's fused
fast-math GELU costs (~1.8 ms per 1M elements); for 64-row products MKL was 25% faster, and
oneDNN's tanh-GELU post-op cost ~4.7 ms per 1M elements. Hence: only products of at least
`options.ONEDNN_MIN_FLOPS` are offloaded, tanh-GELU stays a TVM kernel, everything smaller
goes through `dispatch.dispatch_matmuls` (MKL). `CompileOptions(extra=(("onednn",
False),))` turns the offload off.

Only float32 is offloaded (oneDNN's fp16/bf16 CPU kernels need AVX-512 extensions).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from hetero.backends.tvm.dispatch import eligible

# Post-op name (also the suffix of the FFI function) -> the Relax op it absorbs.
ACTIVATIONS = {"gelu": "relax.nn.gelu", "relu": "relax.nn.relu"}
PREFIX = "hetero.onednn.linear"


def kernel_names() -> tuple[str, ...]:
    return (PREFIX, *(f"{PREFIX}_{a}" for a in ACTIVATIONS), f"{PREFIX}_add")


def register(register_global_func) -> None:
    """Register the oneDNN linear kernels through `register_global_func(name, fn)`."""
    import tvm  # optional (hetero[tvm]): loaded on first use

    onednn = torch.backends.mkldnn.is_available()
    linear_pw = torch.ops.mkldnn._linear_pointwise if onednn else None
    act_args = {"gelu": ("gelu", "none"), "relu": ("relu", "")}
    fallback = {"gelu": torch.nn.functional.gelu, "relu": torch.relu}

    def view(t):
        return torch.from_dlpack(t)

    def plain(x, w, b):
        if linear_pw is not None:
            y = linear_pw(view(x), view(w), view(b), "none", [], "")
        else:
            y = torch.nn.functional.linear(view(x), view(w), view(b))
        return tvm.runtime.from_dlpack(y)

    def with_activation(name):
        attr, algo = act_args[name]

        def run(x, w, b):
            if linear_pw is not None:
                y = linear_pw(view(x), view(w), view(b), attr, [], algo)
            else:
                y = fallback[name](torch.nn.functional.linear(view(x), view(w), view(b)))
            return tvm.runtime.from_dlpack(y)

        return run

    def with_residual(x, w, b, other):
        if linear_pw is not None:
            y = linear_pw.binary(view(x), view(other), view(w), view(b), "add")
        else:
            y = torch.nn.functional.linear(view(x), view(w), view(b)) + view(other)
        return tvm.runtime.from_dlpack(y)

    register_global_func(PREFIX, plain)
    for name in ACTIVATIONS:
        register_global_func(f"{PREFIX}_{name}", with_activation(name))
    register_global_func(f"{PREFIX}_add", with_residual)


@dataclass(frozen=True)
class _Chain:
    """matmul(x, W^T) [+ bias] [reshape...] [activation | + residual], each link used once."""

    x: object
    weight_t: object  # tvm.ir.expr.Constant [K, N]
    bias: object | None  # tvm.ir.expr.Constant, N elements
    post: str  # "" | an ACTIVATIONS key | "add"
    residual: object | None
    absorbed: frozenset  # vars of the links the call makes dead


def offload_linears(mod, min_flops: int = 0):
    """Rewrite every float32 Linear chain of `mod`'s Relax functions into one oneDNN call."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            chains = _find_chains(func, min_flops)
            if chains:
                mod[gv] = _rewrite(func, chains)
    return mod


def _find_chains(func, min_flops: int) -> dict:
    import tvm  # optional (hetero[tvm]): loaded on first use
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # Every use counts (match_cast bindings of dynamic shapes included): a link used
    # anywhere outside its chain must survive, so that chain is left alone.
    value, uses, user = {}, Counter(), {}
    for block in func.body.blocks:
        for b in block.bindings:
            if isinstance(b, relax.VarBinding):
                value[b.var] = b.value
            for v in relax.analysis.free_vars(b.value):
                uses[v] += 1
                user[v] = b.var
    for v in relax.analysis.free_vars(func.body.body):
        uses[v] += 1

    def op_name(var):
        val = value.get(var)
        return val.op.name if isinstance(val, relax.Call) and hasattr(val.op, "name") else ""

    def only_user(var, *ops):
        nxt = user.get(var)
        return nxt if uses[var] == 1 and nxt is not None and op_name(nxt) in ops else None

    chains = {}
    for var, val in value.items():
        if op_name(var) != "relax.matmul":
            continue
        x, w = val.args
        if not (isinstance(w, tvm.ir.expr.Constant) and _f32_2d_weight(x, w, val, min_flops)):
            continue
        n = int(w.ty.shape[-1])
        absorbed, cur, bias = [var], var, None
        nxt = only_user(cur, "relax.add")
        if nxt is not None:
            other = [a for a in value[nxt].args if not a.same_as(cur)]
            if len(other) == 1 and _is_bias(other[0], n):
                bias, cur = other[0], nxt
                absorbed.append(cur)
        tail, post, residual, reshapes = cur, "", None, []
        while (nxt := only_user(tail, "relax.reshape")) is not None:
            tail = nxt
            reshapes.append(tail)
        nxt = only_user(tail, *ACTIVATIONS.values())
        if nxt is not None:
            post = next(k for k, v in ACTIVATIONS.items() if v == op_name(nxt))
            end = nxt
        elif (nxt := only_user(tail, "relax.add")) is not None:
            a, b = value[nxt].args
            other = b if a.same_as(tail) else a
            if not isinstance(other, tvm.ir.expr.Constant) and _same_shape(other, tail):
                post, residual, end = "add", other, nxt
        if post:
            absorbed += reshapes  # the epilogue joins the call; without one they stay
        else:
            if bias is None:
                continue  # a bare matmul: dispatch_matmuls' BLAS call does as well
            end = cur
        absorbed = [v for v in absorbed if not v.same_as(end)]
        # keyed by the var whose value the fused call replaces
        chains[end] = _Chain(x, w, bias, post, residual, frozenset(absorbed))
    return chains


def _rewrite(func, chains: dict):
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.expr_functor import PyExprMutator, mutator

    dead = frozenset().union(*(c.absorbed for c in chains.values()))

    @mutator
    class Rewriter(PyExprMutator):
        def visit_var_binding_(self, binding):
            if binding.var in dead:
                return
            chain = chains.get(binding.var)
            if chain is None:
                return super().visit_var_binding_(binding)
            x = self.visit_expr(chain.x)
            x_shape = list(x.ty.shape)
            w_t = chain.weight_t.value.numpy()
            n = w_t.shape[-1]
            weight = relax.const(np.ascontiguousarray(w_t.T), "float32")
            if chain.bias is not None:
                bias = relax.const(chain.bias.value.numpy().reshape(n).astype("float32"))
            else:
                bias = relax.const(np.zeros(n, "float32"))
            out_shape = [*x_shape[:-1], n]
            args = [x, weight, bias]
            if chain.post == "add":
                other = self.visit_expr(chain.residual)
                args.append(self.builder_.emit(relax.op.reshape(other, out_shape)))
            name = PREFIX + (f"_{chain.post}" if chain.post else "")
            ty = relax.TensorType(out_shape, "float32")
            call = relax.op.call_pure_packed(relax.ExternFunc(name), *args, ty_args=ty)
            want = list(binding.var.ty.shape)
            # A var that leaves its dataflow block must be bound by emit_output.
            last = (
                self.builder_.emit
                if isinstance(binding.var, relax.DataflowVar)
                else self.builder_.emit_output
            )
            if _dims_equal(want, out_shape):
                y = last(call)
            else:
                y = last(relax.op.reshape(self.builder_.emit(call), want))
            self.set_var_remap(binding.var, y)

    return Rewriter().visit_expr(func)


def _f32_2d_weight(x, w, call, min_flops: int) -> bool:
    """A float32 product with a 2-D weight that `dispatch` would send to a library too."""

    if not eligible(x.ty, w.ty, call.ty, min_flops):
        return False
    return str(call.ty.dtype) == "float32" and len(w.ty.shape) == 2


def _is_bias(expr, n: int) -> bool:
    import tvm  # optional (hetero[tvm]): loaded on first use

    if not isinstance(expr, tvm.ir.expr.Constant) or str(expr.ty.dtype) != "float32":
        return False
    shape = [int(d) for d in expr.ty.shape]
    return bool(shape) and shape[-1] == n and all(d == 1 for d in shape[:-1])


def _same_shape(a, b) -> bool:
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    ta, tb = a.ty, b.ty
    if not (isinstance(ta, relax.TensorType) and isinstance(tb, relax.TensorType)):
        return False
    if ta.shape is None or tb.shape is None or str(ta.dtype) != str(tb.dtype):
        return False
    return _dims_equal(list(ta.shape), list(tb.shape))


def _dims_equal(a: list, b: list) -> bool:
    import tvm  # optional (hetero[tvm]): loaded on first use

    ana = tvm.sym.Analyzer()
    return len(a) == len(b) and all(ana.can_prove_equal(x, y) for x, y in zip(a, b, strict=True))
