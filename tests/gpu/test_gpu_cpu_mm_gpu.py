"""`hetero::gpu_cpu_mm` and `hetero::gpu_cpu_mlp` on a real GPU: the CPU's rows come back
right, call after call on the same staging buffers, while a layer's weights stream on another stream (the copy engine is
busy, the op must not wait for it or read a buffer being rewritten)."""

from __future__ import annotations

import pytest
import torch

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm, mlp_share

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
def test_each_call_returns_its_own_product_while_weights_stream(dtype, cpu_dtype):
    g = torch.Generator().manual_seed(0)
    w_gpu = torch.randn(192, 256, generator=g).to(dtype).cuda()
    w_cpu = torch.randn(320, 256, generator=g).to(cpu_dtype)
    # batches that grow the staging buffers and shrink again between calls
    xs = [torch.randn(b, 256, generator=g).to(dtype).cuda() for b in (2, 2, 5, 1, 9, 2)]
    link = _stream_weights()
    outs = [gpu_cpu_mm(x, w_gpu, w_cpu) for x in xs]  # results kept: none may be overwritten
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
def test_each_mlp_call_adds_its_own_cpu_share_between_gpu_cpu_mm_calls(dtype, cpu_dtype, act):
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
    for x in xs:
        mms.append(gpu_cpu_mm(x, w_mm.cuda(), w_mm))
        outs.append(gpu_cpu_mlp(x, w_gpu, w_cpu, act, True))
    torch.cuda.synchronize()
    del link
    for x, y, (_, y_mm) in zip(xs, outs, mms, strict=True):
        assert y.device == x.device and y.dtype == dtype and y.shape == x.shape
        cpu_share = mlp_share(x.cpu().to(cpu_dtype), w_cpu, act, True)
        want = mlp_share(x, w_gpu, act, True).add_(cpu_share.cuda())  # the op's own arithmetic
        torch.testing.assert_close(y, want, rtol=1e-3, atol=1e-3)
        assert torch.equal(y_mm.cpu(), (x.cpu().to(dtype) @ w_mm.t()).to(dtype))


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(256, 640, bias=False)
        self.up = torch.nn.Linear(256, 640, bias=False)
        self.down = torch.nn.Linear(640, 256, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.silu(self.gate(x)) * self.up(x))


def test_a_split_mlp_exports_and_compiles_with_inductor_on_the_gpu():
    """The rewritten program, its GPU share on the GPU and its CPU share in host memory,
    through torch.export and Inductor (the op one opaque call in the compiled code)."""
    from hetero.partitioner.graph import capture
    from hetero.runtime.split_linear import shares, split_program

    torch.manual_seed(0)
    mlp = _Mlp().eval()
    x = torch.randn(1, 3, 256)
    graph = capture(mlp, (x,))
    gm = graph.program.graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params = {name: graph.program.state_dict[fqn] for name, (fqn, _) in graph.params.items()}
    split, inputs, groups = split_program(
        gm, names, 0.4, {n: tuple(params[n].shape) for n in params}
    )
    gpu, cpu = shares(params, groups)
    values = {**{k: v.cuda() for k, v in gpu.items()}, **cpu, names[-1]: x.cuda()}
    args = tuple(values[n] for n in inputs)
    ep = torch.export.export(split, args)
    assert sum(n.target is gpu_cpu_mlp for n in ep.graph.nodes) == 1
    compiled = torch.compile(ep.module(), backend="inductor", fullgraph=True)
    for _ in range(3):
        (out,) = compiled(*args)
    with torch.no_grad():
        want = mlp.cuda()(x.cuda())
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.long])
def test_host_to_device_gives_each_call_its_own_values_while_weights_stream(dtype):
    """A CPU stage's activations read by the GPU from one pinned buffer per role, call after
    call (into a fresh tensor and into a graph's static input), never a stale or torn one."""
    from hetero.backends.gpu_cpu_mm import host_to_device

    dev = torch.device("cuda")
    keep = _stream_weights()
    static = torch.empty(3, 4096, dtype=dtype, device=dev)
    got, want = [], []
    for k in range(8):
        t = (torch.arange(3 * 4096) % 97 + k).reshape(3, 4096).to(dtype)
        got.append(host_to_device(t, dev, "test:a").clone())
        host_to_device(t + 1, dev, "test:b", out=static)
        got.append(static.clone())
        want += [t, t + 1]
    torch.cuda.synchronize()
    del keep
    for g, w in zip(got, want, strict=True):
        assert g.device.type == "cuda" and torch.equal(g.cpu(), w)
