"""Vectorizable legalizations of the transcendental ops (GELU, erf, tanh, exp, softmax).

TVM's stock legalization computes `erf`, `tanh` and `exp` with LLVM intrinsics that x86
lowers to scalar libm calls, one element at a time: the bias+GELU kernel of a GPT-2 MLP
block (8x128x1024 fp32) took 9.1 ms on 2 cores, half the time of the two matmuls around
it. TOPI's `fast_erf`, `fast_tanh` and `fast_exp` are rational/polynomial approximations
built from arithmetic TIR that the CPU schedules vectorize (float32 error ~1e-7, below
the backend's 1e-4 contract); for other dtypes TOPI falls back to the exact functions.

They plug in through `LegalizeOps(customize_legalize_map=...)`, TVM's extension point for
exactly this, so the ops stay whole in Relax (fusion and the importer are unaffected).
`CompileOptions(fast_math=False)` keeps the exact versions.
"""

from __future__ import annotations

import math


def legalize_map() -> dict:
    """{Relax op name: legalization} for the fast transcendental versions."""
    from tvm import te, tirx, topi  # optional (hetero[tvm]): loaded on first use

    def gelu(bb, call):
        def f(x: te.Tensor):
            dt = x.dtype
            erf = topi.fast_erf(x * tirx.const(math.sqrt(0.5), dt))
            return x * (tirx.const(0.5, dt) + erf * tirx.const(0.5, dt))

        return bb.call_te(f, call.args[0], primfunc_name_hint="gelu")

    def gelu_tanh(bb, call):
        def f(x: te.Tensor):
            dt = x.dtype
            inner = tirx.const(math.sqrt(2.0 / math.pi), dt) * (
                x + tirx.const(0.044715, dt) * x * x * x
            )
            return tirx.const(0.5, dt) * x * (tirx.const(1.0, dt) + topi.fast_tanh(inner))

        return bb.call_te(f, call.args[0], primfunc_name_hint="gelu_tanh")

    def unary(fn, hint):
        return lambda bb, call: bb.call_te(fn, call.args[0], primfunc_name_hint=hint)

    def softmax(bb, call):
        return bb.call_te(
            topi.nn.fast_softmax, call.args[0], call.attrs.axis, primfunc_name_hint="softmax"
        )

    return {
        "relax.nn.gelu": gelu,
        "relax.nn.gelu_tanh": gelu_tanh,
        "relax.erf": unary(topi.fast_erf, "erf"),
        "relax.tanh": unary(topi.fast_tanh, "tanh"),
        "relax.exp": unary(topi.fast_exp, "exp"),
        "relax.nn.softmax": softmax,
    }
