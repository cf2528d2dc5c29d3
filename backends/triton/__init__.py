"""hetero's Triton backend: graph-level fusion and generated Triton kernels for GPUs.

Stages, in the order data flows: fold.py (weights laid out at compile time) -> rewrite.py
(ATen -> cheaper ATen: GQA without copies, batch-norm folded) -> fusion.py + patterns.py +
matchers.py (ATen graph -> fused groups) -> kernels/ (templates) -> codegen.py (one
readable program) -> autotune.py (tiles per GPU and shape) -> backend.py (artifact, load)
-> graphs.py (CUDA graph replay).
"""

from hetero.backends.triton.backend import TritonBackend

__all__ = ["TritonBackend"]
