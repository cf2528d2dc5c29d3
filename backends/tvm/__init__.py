"""Apache TVM backend (Relax): llvm for CPUs and emulated NPUs, CUDA with dlight schedules.

Importing this package does not import TVM; the backend does on first use.
"""

from hetero.backends.tvm.backend import TVMBackend

__all__ = ["TVMBackend"]
