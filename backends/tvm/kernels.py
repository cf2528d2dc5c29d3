"""The torch-backed kernels a TVM artifact calls by name (dispatch.py's BLAS matmul,
linear.py's oneDNN linear layers): registered in every process that compiles or loads one."""

from __future__ import annotations

import functools

from hetero.backends.tvm import dispatch, linear


@functools.cache
def register_kernels() -> None:
    """Register the torch-backed kernels with TVM's global function table (once per process)."""
    import tvm  # optional (hetero[tvm]): only a process that compiles or loads TVM needs it

    tvm.register_global_func(dispatch.MATMUL, dispatch.matmul, override=True)
    tvm.register_global_func(dispatch.MATMUL_NT, dispatch.matmul_nt, override=True)
    linear.register(lambda name, fn: tvm.register_global_func(name, fn, override=True))
