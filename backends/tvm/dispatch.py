"""Send dense matmuls to torch's BLAS from inside a TVM-compiled CPU module.

TVM's untuned CPU matmul is ~100x slower than MKL/OpenBLAS, and MetaSchedule needs
thousands of trials to close the gap. TVM's own cblas/cublas dispatch replaces each
matmul with `R.call_dps_packed` of a library function; we do the same with a function
registered through TVM's FFI that runs `torch.matmul(..., out=...)` on DLPack views (no
copies). The ops around each matmul (bias, GELU, residual, LayerNorm) stay in TVM and fuse.

The function is looked up by name when the module runs, so the process that *loads* an
artifact must register it too: `kernels.register_kernels()` is idempotent and the backend
calls it in both compile() and load().
"""

from __future__ import annotations

import torch

MATMUL = "hetero.torch.matmul"
# a @ b.T, b a [N, K] weight: a constant weight is handed over in this layout
MATMUL_NT = "hetero.torch.matmul_nt"
KERNELS = (MATMUL, MATMUL_NT)  # plus linear.kernel_names()


def matmul(a, b, out) -> None:
    """The kernel behind MATMUL: torch's BLAS on DLPack views of TVM's arrays."""
    torch.matmul(torch.from_dlpack(a), torch.from_dlpack(b), out=torch.from_dlpack(out))


def matmul_nt(a, w, out) -> None:
    """The kernel behind MATMUL_NT: a @ w.T, w stored [N, K] as nn.Linear keeps it."""
    torch.matmul(torch.from_dlpack(a), torch.from_dlpack(w).t(), out=torch.from_dlpack(out))


def _rows_first_pays(b) -> bool:
    """A 2-D 16-bit constant weight. float32 keeps [K, N]: its product reads either layout
    at about one rate (dev box: 0.130 against 0.132 ms for 1x768x3072, 3.10 against 2.92 for
    128 rows; `benchmarks/tvm_call_cpu.py` within noise either way)."""
    import tvm  # optional (hetero[tvm]): loaded on first use

    return (
        isinstance(b, tvm.ir.expr.Constant)
        and len(b.ty.shape) == 2
        and str(b.ty.dtype) in ("float16", "bfloat16")
    )


def _rows_first(weight):
    """A folded [K, N] weight constant as the [N, K] constant MATMUL_NT reads (a copy, made
    once at compile time; DLPack keeps bfloat16, which numpy does not)."""
    import tvm  # optional (hetero[tvm]): loaded on first use
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    rows = torch.from_dlpack(weight.value).t().contiguous()
    return relax.const(tvm.runtime.from_dlpack(rows))


def dispatch_matmuls(mod, min_flops: int = 0):
    """Rewrite every float `relax.matmul` of `mod`'s Relax functions into a BLAS call.

    `min_flops` keeps tiny matmuls in TVM, where a call into Python would cost more than the
    product. Call after FoldConstant so constant weight transposes are folded first.
    """
    import tvm  # optional (hetero[tvm]): loaded on first use
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.expr_functor import PyExprMutator, mutator

    matmul_op = tvm.ir.Op.get("relax.matmul")

    @mutator
    class Rewriter(PyExprMutator):
        def visit_call_(self, call):
            call = super().visit_call_(call)
            if not isinstance(call, relax.Call) or call.op != matmul_op:
                return call
            a, b = call.args
            out_ty = call.ty
            if not eligible(a.ty, b.ty, out_ty, min_flops):
                return call
            if _rows_first_pays(b):
                # FoldConstant turned nn.Linear's transposed weight into a [K, N] constant;
                # torch's 16-bit CPU product reads it far faster back as [N, K], a @ W.T
                # (float16, dev box: 3.2 ms against 0.12 for 1x768x3072; the MLP block
                # pinned to TVM in float16 took 481-513 ms a call, now 30-38, eager 28-40:
                # benchmarks/tvm_call_cpu.py --dtype float16)
                return relax.op.call_dps_packed(
                    relax.ExternFunc(MATMUL_NT), [a, _rows_first(b)], out_ty=out_ty
                )
            return relax.op.call_dps_packed(relax.ExternFunc(MATMUL), [a, b], out_ty=out_ty)

    rewriter = Rewriter()
    for gv, func in list(mod.functions.items()):
        if isinstance(func, relax.Function):
            mod[gv] = rewriter.visit_expr(func)
    return mod


def eligible(a_ty, b_ty, out_ty, min_flops: int) -> bool:
    """Typed, same-dtype float matrix product of at least `min_flops` (when its size is
    known): what a library kernel should run instead of TVM."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    for t in (a_ty, b_ty, out_ty):
        if not isinstance(t, relax.TensorType) or t.shape is None:
            return False
    dtypes = {str(a_ty.dtype), str(b_ty.dtype), str(out_ty.dtype)}
    if len(dtypes) != 1 or dtypes.pop() not in ("float32", "float64", "float16", "bfloat16"):
        return False
    if len(a_ty.shape) < 2 or len(b_ty.shape) < 2:  # vector products: leave to TVM
        return False
    if min_flops:
        dims = [*out_ty.shape, a_ty.shape[-1]]
        if all(isinstance(d, int) or hasattr(d, "value") for d in dims):
            flops = 2
            for d in dims:
                flops *= int(d)
            if flops < min_flops:
                return False
    return True
