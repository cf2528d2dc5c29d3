"""hetero::grouped_mm on a GPU: the kernel against transformers' loop in float16 and
bfloat16, and the operator captured in a CUDA graph (the loop cannot be: it reads the runs'
bounds on the host).

Skipped where CUDA is absent. Run: pytest tests/gpu/test_grouped_mm_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _case(dtype, rows=300, depth=256, cols=384, experts=8):
    g = torch.Generator(device="cuda").manual_seed(0)
    counts = torch.randint(0, 2 * rows // experts, (experts,), generator=g, device="cuda")
    counts[2] = 0  # an expert no row chose
    offs = counts.cumsum(0)
    x = torch.randn(int(offs[-1]) + 5, depth, generator=g, device="cuda", dtype=dtype)
    w = torch.randn(experts, depth, cols, generator=g, device="cuda", dtype=dtype) / depth**0.5
    return x, w, offs


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_the_kernel_equals_the_loop(dtype):
    from hetero.backends.grouped_mm import kernel_works, looped

    assert kernel_works(dtype, torch.cuda.current_device())  # the operator runs the kernel

    x, w, offs = _case(dtype)
    got = torch.ops.hetero.grouped_mm(x, w, offs)
    want = looped(x.float(), w.float(), offs)
    tol = 1e-5 if dtype == torch.float32 else (2e-2 if dtype == torch.bfloat16 else 3e-3)
    torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol)
    assert not got[int(offs[-1]) :].any()


def test_the_operator_replays_in_a_cuda_graph_with_new_runs():
    x, w, offs = _case(torch.float16)
    static_offs = offs.clone()
    torch.ops.hetero.grouped_mm(x, w, static_offs)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = torch.ops.hetero.grouped_mm(x, w, static_offs)
    moved = torch.flip(offs.diff(prepend=offs.new_zeros(1)), [0]).cumsum(0)
    static_offs.copy_(moved)  # other runs of rows, same total
    graph.replay()
    torch.testing.assert_close(out, torch.ops.hetero.grouped_mm(x, w, moved))
