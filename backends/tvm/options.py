"""The TVM backend's own knobs (`CompileOptions.extra`, parsed into `TVMOptions`)."""

from __future__ import annotations

from dataclasses import dataclass

from hetero.backends.base import BackendOptions

# Linear layers at least this big go to oneDNN with their epilogues (linear.py says why).
ONEDNN_MIN_FLOPS = 1 << 27


@dataclass(frozen=True)
class TVMOptions(BackendOptions):
    blas: bool = True  # dense matmuls to torch's BLAS (dispatch.py); False: TVM kernels
    onednn: bool = True  # large Linear layers with their epilogues to oneDNN (linear.py)
    onednn_min_flops: int = ONEDNN_MIN_FLOPS  # smaller Linear layers stay with BLAS/TVM
    fast_math: bool = True  # vectorizable GELU/erf/tanh/exp/softmax (fastmath.py)
    tuning_dir: str | None = None  # MetaSchedule database; None: under the artifact cache
    progress: bool = True  # show a progress bar while tuning
    mcpu: str = ""  # LLVM -mcpu for CPU/NPU targets; "": the device's, else this host's
    arch: str = ""  # CUDA SM architecture (sm_90); "": guessed from the GPU's model name
