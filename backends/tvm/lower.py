"""The Relax pipeline from an imported partition to a VM executable, per target kind.

CPU (llvm, also for emulated NPUs):
  DecomposeOpsForInference -> FoldConstant (weight transposes/casts happen here, once)
  -> large Linear layers with their bias/GELU/residual epilogues to oneDNN (linear.py),
     the other dense matmuls to torch's BLAS (dispatch.py)
  -> LegalizeOps, with vectorizable GELU/erf/tanh/exp/softmax (fastmath.py) -> FuseOps/FuseTIR
  -> tuned schedules from the MetaSchedule database where it has them (tune.py)
  -> default parallel/vectorized CPU schedules for the rest (schedule.py)
  -> the large constants (weights, as the passes left them) lifted into `main`'s
     parameters, saved beside the library (params.py)
  -> TVM's CPU lowering and finalisation passes.
CUDA: TVM's default CUDA pipeline, whose legalisation applies dlight's GPU rules.
"""

from __future__ import annotations

import torch

from hetero.backends.base import CompileOptions, CompileUnit
from hetero.backends.tvm import targets
from hetero.backends.tvm.dispatch import dispatch_matmuls
from hetero.backends.tvm.fastmath import legalize_map
from hetero.backends.tvm.frontend import to_relax
from hetero.backends.tvm.kernels import register_kernels
from hetero.backends.tvm.linear import offload_linears
from hetero.backends.tvm.options import ONEDNN_MIN_FLOPS, TVMOptions
from hetero.backends.tvm.params import lift_constants
from hetero.backends.tvm.schedule import apply_cpu_schedules
from hetero.backends.tvm.tune import apply_tuning
from hetero.cluster.spec import DeviceSpec

# Products smaller than this stay in TVM: the FFI call into torch costs a few µs.
MIN_BLAS_FLOPS = 1 << 16
__all__ = ["MIN_BLAS_FLOPS", "ONEDNN_MIN_FLOPS", "build", "fuse", "optimize_cpu"]


def build(
    unit: CompileUnit,
    device: DeviceSpec,
    options: CompileOptions,
    dtype: torch.dtype | None,
    *,
    safe_indexing: bool = True,
):
    """(VM executable, pytree spec of the unit's outputs, the weights its `main` takes after
    the activations: TVM tensors, see params.py). `safe_indexing=False` is for
    benchmarks/safe_gather.py alone (frontend.to_relax says why)."""
    import tvm  # optional (hetero[tvm]): loaded on first use

    target = targets.make_target(device, options)
    mod, out_spec = to_relax(unit, dtype, safe_indexing=safe_indexing)
    if target.kind.name == "cuda":
        # the default CUDA pipeline folds weight transposes itself: they stay constants
        return tvm.compile(mod, target, relax_pipeline="default"), out_spec, ()
    mod = optimize_cpu(mod, target, options)
    mod, weights = lift_constants(mod)
    return tvm.compile(mod, target, relax_pipeline=_cpu_lowering(target)), out_spec, weights


def optimize_cpu(mod, target, options: CompileOptions):
    """Everything up to scheduled, fused TIR (the part tune.py also uses)."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    own = TVMOptions.parse(options, "tvm")
    register_kernels()
    with target:
        mod = relax.transform.DeadCodeElimination()(mod)
        mod = relax.transform.DecomposeOpsForInference()(mod)
        mod = tvm_seq(*cpu.library_dispatch_passes(target))(mod)  # sort/scan/sampling kernels
        mod = relax.transform.FoldConstant()(mod)
        if own.blas:
            if own.onednn:
                mod = offload_linears(mod, min_flops=own.onednn_min_flops)
            mod = dispatch_matmuls(mod, min_flops=MIN_BLAS_FLOPS)
        mod = fuse(mod, fast_math=own.fast_math)
        if options.tune_trials > 0:
            mod = apply_tuning(mod, target, options)
        mod = apply_cpu_schedules(mod, target)
    return mod


def fuse(mod, fast_math: bool = True):
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    return tvm_seq(
        relax.transform.LegalizeOps(legalize_map() if fast_math else None),
        relax.transform.AnnotateTIROpPattern(),
        # No FoldConstant here: folding legalized kernels JIT-builds each one with LLVM
        # (seconds per partition) to precompute masks that cost microseconds at run time.
        relax.transform.FuseOps(),
        relax.transform.FuseTIR(),
        # Before scheduling: a scheduled reshape kernel is no longer recognised as a view.
        relax.transform.RewriteDataflowReshape(),
    )(mod)


def tvm_seq(*passes):
    import tvm  # optional (hetero[tvm]): loaded on first use

    return tvm.transform.Sequential(list(passes))


def _cpu_lowering(target):
    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    return tvm_seq(*cpu.dataflow_lower_passes(target), *cpu.finalize_passes(target))
