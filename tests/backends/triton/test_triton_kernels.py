"""Every kernel template, generated and run under Triton's interpreter, against eager.

Small shapes, odd sizes (ragged tiles, padded rows), float32 and float16. On a machine
with CUDA and TRITON_INTERPRET unset these run on the GPU instead.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch
from triton_models import (
    Attention,
    BmmScale,
    Elementwise,
    LayerNormResidual,
    LinearEpilogue,
    ManualSoftmax,
    RMSNorm,
    Softmax,
    WithFallback,
    assert_close,
    build,
)

from hetero.backends.triton import TritonBackend


def _dev() -> str:
    return (
        "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
    )


def case(name: str):
    """(model, inputs, dtype) for one pattern."""
    g = torch.Generator().manual_seed(hash(name) % 1000)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    if name == "linear_gelu_tanh_residual":
        return LinearEpilogue("tanh"), (r(2, 5, 32),), torch.float32
    if name == "linear_gelu_erf_fp16":
        return LinearEpilogue("none").half(), (r(2, 5, 32, dtype=torch.float16),), torch.float16
    if name == "bmm_scale_relu":
        return BmmScale(), (r(3, 7, 20), r(3, 20, 9)), torch.float32
    if name == "layernorm_residual":
        return LayerNormResidual(), (r(3, 4, 40), r(3, 4, 40)), torch.float32
    if name == "rmsnorm_fp16":
        return RMSNorm().half(), (r(2, 3, 40, dtype=torch.float16),), torch.float16
    if name == "softmax":
        return Softmax(), (r(5, 33),), torch.float32
    if name == "log_softmax":
        return Softmax(log=True), (r(5, 33),), torch.float32
    if name == "softmax_written_out":
        return ManualSoftmax(), (r(4, 2, 19),), torch.float32
    if name == "elementwise_broadcast":
        return Elementwise(), (r(3, 17), r(17)), torch.float32
    if name == "aten_fallback_between_kernels":
        return WithFallback(), (r(2, 3, 24),), torch.float32
    if name.startswith("sdpa_"):
        mode, dtype = name.split("_")[1], torch.float16 if name.endswith("fp16") else torch.float32
        q, k, v = (
            r(2, 2, 9, 16, dtype=dtype),
            r(2, 2, 11, 16, dtype=dtype),
            r(2, 2, 11, 16, dtype=dtype),
        )
        if mode == "causal":
            k, v = k[:, :, :9], v[:, :, :9]
        return Attention(mode), (q, k, v, torch.tensor([11, 6])), dtype
    raise KeyError(name)


CASES = [
    "linear_gelu_tanh_residual",
    "linear_gelu_erf_fp16",
    "bmm_scale_relu",
    "layernorm_residual",
    "rmsnorm_fp16",
    "softmax",
    "log_softmax",
    "softmax_written_out",
    "elementwise_broadcast",
    "aten_fallback_between_kernels",
    "sdpa_causal",
    "sdpa_plain",
    "sdpa_bool",
    "sdpa_float",
    "sdpa_causal_fp16",
]


@pytest.mark.parametrize("name", CASES)
def test_kernels_match_eager(name, tmp_path):
    model, args, dtype = case(name)
    model = model.eval()
    with torch.no_grad():
        want = model(*args)
    run, man = build(TritonBackend(), model, args, tmp_path)
    assert "fused launches" in man.notes
    (got,) = run(*[a.to(_dev()) for a in args])
    assert got.shape == want.shape and got.dtype == want.dtype
    assert_close(got.cpu(), want, dtype)
