"""The Triton backend on a real GPU: compiled kernels, autotuning cache, CUDA graph replay.

Skipped where CUDA is absent. Run: pytest tests/gpu (TRITON_INTERPRET unset).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _models():
    from triton_models import Attention, LayerNormResidual, LinearEpilogue, RMSNorm

    h = torch.float16
    return {
        "linear_epilogue": (LinearEpilogue("tanh", d=64, h=256).half(), (torch.randn(4, 33, 64, dtype=h),)),
        "layernorm": (LayerNormResidual(d=768).half(), (torch.randn(64, 768, dtype=h),) * 2),
        "rmsnorm": (RMSNorm(d=512).half(), (torch.randn(8, 512, dtype=h),)),
        "attention_causal": (
            Attention("causal"),
            (*(torch.randn(2, 4, 100, 64, dtype=h) for _ in range(3)), torch.tensor([100, 60])),
        ),
        "attention_padding": (
            Attention("bool"),
            (*(torch.randn(2, 4, 100, 64, dtype=h) for _ in range(3)), torch.tensor([100, 60])),
        ),
    }  # fmt: skip


@pytest.mark.parametrize("name", ["linear_epilogue", "layernorm", "rmsnorm", "attention_causal",
                                  "attention_padding"])  # fmt: skip
def test_compiled_kernels_match_eager(name, tmp_path):
    from triton_models import assert_close, build

    from hetero.backends.triton import TritonBackend

    model, args = _models()[name]
    model = model.cuda().eval()
    args = tuple(a.cuda() for a in args)
    with torch.no_grad():
        want = model(*args)
    run, man = build(TritonBackend(), model, args, tmp_path)
    assert man.target.endswith(":cuda")
    (got,) = run(*args)
    assert_close(got, want, torch.float16)
    (again,) = run(*args)  # a CUDA graph replay
    torch.testing.assert_close(again, got)


def test_autotuning_writes_its_cache_beside_the_artifact(tmp_path):
    from triton_models import LinearEpilogue, build

    from hetero.backends.base import CompileOptions
    from hetero.backends.triton import TritonBackend

    model = LinearEpilogue("tanh", d=64, h=128).half().cuda()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    build(TritonBackend(), model, (x,), tmp_path, CompileOptions(tune_trials=2))
    (cache,) = (tmp_path / "triton-autotune").glob("*.json")
    table = json.loads(cache.read_text())
    assert table and all("BLOCK_M" in c for c in table.values())
    src = (tmp_path / "artifact" / "program.py").read_text()
    assert any(str(c["BLOCK_M"]) in src for c in table.values())
