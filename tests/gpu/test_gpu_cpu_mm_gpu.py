"""`hetero::gpu_cpu_mm` and `hetero::gpu_cpu_mlp` on a real GPU: the CPU's rows come back
right, call after call on the same staging buffers, while a layer's weights stream on another
stream (the copy engine is busy, the op must not wait for it or read a buffer being
rewritten); synchronous, and overlapped (the CPU's share a queued task, the stream waiting on
its flag)."""

from __future__ import annotations

import contextlib

import pytest
import torch

from hetero.backends.gpu_cpu_mm import _STAGING, gpu_cpu_mlp, gpu_cpu_mm, mlp_share, overlapped

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _stream_weights() -> tuple[torch.Tensor, torch.Tensor]:
    """Keeps the copy engine busy as a streaming layer does: 256 MiB queued on a side stream
    (the buffers are returned so they live until the caller synchronises)."""
    src = torch.empty(64 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    with torch.cuda.stream(torch.cuda.Stream()):
        for _ in range(4):
            dst.copy_(src, non_blocking=True)
    return src, dst


@pytest.mark.parametrize(
    ("dtype", "cpu_dtype"),
    [
        (torch.float16, torch.float16),
        (torch.float16, torch.bfloat16),
        (torch.bfloat16, torch.bfloat16),
        (torch.float32, torch.float32),
    ],
)
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_each_call_returns_its_own_product_while_weights_stream(dtype, cpu_dtype, overlap):
    g = torch.Generator().manual_seed(0)
    w_gpu = torch.randn(192, 256, generator=g).to(dtype).cuda()
    w_cpu = torch.randn(320, 256, generator=g).to(cpu_dtype)
    # batches that grow the staging buffers and shrink again between calls
    xs = [torch.randn(b, 256, generator=g).to(dtype).cuda() for b in (2, 2, 5, 1, 9, 2)]
    link = _stream_weights()
    with overlapped() if overlap else contextlib.nullcontext():
        # results kept: none may be overwritten
        outs = [gpu_cpu_mm(x, w_gpu, w_cpu) for x in xs]
    torch.cuda.synchronize()
    del link
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype != torch.float32 else {"rtol": 1e-4, "atol": 1e-4}
    for x, (y_gpu, y_cpu) in zip(xs, outs, strict=True):
        assert y_cpu.device == x.device and y_cpu.dtype == dtype
        want = (x.cpu().to(cpu_dtype) @ w_cpu.t()).to(dtype)
        torch.testing.assert_close(y_cpu.cpu(), want, rtol=0, atol=0)
        torch.testing.assert_close(y_gpu.float(), (x @ w_gpu.t()).float(), **tol)


@pytest.mark.parametrize(
    ("dtype", "cpu_dtype"),
    [(torch.float16, torch.bfloat16), (torch.bfloat16, torch.bfloat16), (torch.float32,) * 2],
)
@pytest.mark.parametrize("act", ["silu", "gelu_tanh"])
@pytest.mark.parametrize("overlap", [False, True], ids=["sync", "overlapped"])
def test_each_mlp_call_adds_its_own_cpu_share_between_gpu_cpu_mm_calls(
    dtype, cpu_dtype, act, overlap
):
    """gpu_cpu_mlp's staging buffers are its own: a layer calls gpu_cpu_mm (q/k/v, o) and
    gpu_cpu_mlp in turn, batches grow and shrink, weights stream meanwhile, and each result
    is the GPU's share plus that call's CPU share."""
    g = torch.Generator().manual_seed(0)
    w_gpu = (torch.randn(3 * 96, 256, generator=g) / 16).to(dtype).cuda()
    w_cpu = (torch.randn(3 * 160, 256, generator=g) / 16).to(cpu_dtype)
    w_mm = torch.randn(64, 256, generator=g).to(dtype)
    xs = [torch.randn(b, 256, generator=g).to(dtype).cuda() for b in (2, 2, 5, 1, 9, 2)]
    link = _stream_weights()
    outs, mms = [], []
    with overlapped() if overlap else contextlib.nullcontext():
        for x in xs:
            mms.append(gpu_cpu_mm(x, w_mm.cuda(), w_mm))
            # GPU work between hand-offs reads the last one's rows (as attention does)
            x = x + mms[-1][1][:, :1]
            outs.append(gpu_cpu_mlp(x, w_gpu, w_cpu, act, True))
    torch.cuda.synchronize()
    del link
    for x, y, (_, y_mm) in zip(xs, outs, mms, strict=True):
        assert torch.equal(y_mm.cpu(), (x.cpu().to(dtype) @ w_mm.t()).to(dtype))
        x = x + y_mm[:, :1]
        assert y.device == x.device and y.dtype == dtype and y.shape == x.shape
        cpu_share = mlp_share(x.cpu().to(cpu_dtype), w_cpu, act, True, host=True)
        want = mlp_share(x, w_gpu, act, True).add_(cpu_share.cuda())  # the op's own arithmetic
        torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)


def test_an_overlapped_hand_off_returns_before_the_cpu_has_multiplied():
    """The point of overlapping: the launching thread is back while the task still works
    (a 256 MiB float32 share takes the host milliseconds; one call first, so that kernel
    loading and TorchScript's first runs are not in the race), and the GPU's next kernel
    still sees the rows."""
    w_cpu = torch.randn(16384, 4096)
    w_gpu = torch.randn(64, 4096, device="cuda")
    x = torch.randn(1, 4096, device="cuda")
    with overlapped():
        gpu_cpu_mm(x, w_gpu, w_cpu)[1].sum()
    torch.cuda.synchronize()
    with overlapped():
        chain = _STAGING.chain(x.device)
        assert chain is not None, "stream flags or TorchScript unavailable on this GPU"
        _, y_cpu = gpu_cpu_mm(x, w_gpu, w_cpu)
        queued_and_running = not chain.last.done()
        total = y_cpu.sum()  # queued behind the stream's wait for the task's flag
    assert queued_and_running
    torch.testing.assert_close(total.cpu(), (x.cpu() @ w_cpu.t()).sum(), rtol=1e-4, atol=1e-1)
