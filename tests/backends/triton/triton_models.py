"""Small models for the Triton backend's tests, and the helpers that compile and run them."""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F

from hetero.backends.base import Artifact, CompileOptions, CompileUnit
from hetero.cluster.spec import DeviceSpec
from hetero.partitioner.graph import capture
from hetero.partitioner.split import flatten_inputs, param_values, split

GPU = DeviceSpec("test/gpu0", "gpu", "test", model="test-gpu")


def unit_of(model: torch.nn.Module, *args: torch.Tensor) -> CompileUnit:
    """The whole model as one partition, the way hetero hands it to a backend."""
    return _unit_and_names(model, args)[0]


def _unit_and_names(model, args) -> tuple[CompileUnit, list[str]]:
    graph = capture(model.eval(), args)
    parts = split(graph, {n: 0 for n in graph.order})
    env = flatten_inputs(graph, args)
    return CompileUnit.from_partition(parts[0], env, param_values(graph)), list(env)


def build(backend, model, args, tmp: Path, options: CompileOptions | None = None):
    """Compile + load; returns (run, manifest) where `run` takes the model's own arguments
    (the backend's runner takes the partition's inputs, in the manifest's order)."""
    unit, names = _unit_and_names(model, args)
    out = tmp / "artifact"
    man = backend.compile(unit, GPU, options or CompileOptions(), out)
    runner = backend.load(Artifact(backend.name, f"t{abs(hash(str(tmp)))}", out, {}), GPU)

    def run(*model_args):
        by_name = dict(zip(names, model_args, strict=True))
        return runner(*[by_name[n] for n in man.inputs])

    return run, man


def assert_close(got, want, dtype: torch.dtype) -> None:
    tol = {torch.float32: 2e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}[dtype]
    got, want = got.float(), want.float()
    err = float((got - want).norm() / max(float(want.norm()), 1e-12))
    assert err < tol, f"relative error {err:.2e} over {tol:.0e}"


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def gpt2(layers: int, dim: int, heads: int, vocab: int, ctx: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        n_layer=layers, n_embd=dim, n_head=heads, vocab_size=vocab, n_positions=ctx,
        use_cache=False, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    return GPT2Model(cfg).eval()


# ---- models, one per pattern ------------------------------------------------------------------


class LinearEpilogue(torch.nn.Module):
    """addmm/mm + bias + activation + residual add + cast: one matmul kernel."""

    def __init__(self, approximate: str = "tanh", d: int = 32, h: int = 48) -> None:
        super().__init__()
        self.up = torch.nn.Linear(d, h)
        self.down = torch.nn.Linear(h, d, bias=False)
        self.approximate = approximate

    def forward(self, x):
        y = F.gelu(self.up(x), approximate=self.approximate)
        return (self.down(y) + x).to(torch.float32)


class BmmScale(torch.nn.Module):
    def forward(self, a, b):
        return torch.relu(torch.bmm(a, b) * 0.5 - 0.1)


class LayerNormResidual(torch.nn.Module):
    def __init__(self, d: int = 40) -> None:
        super().__init__()
        self.ln = torch.nn.LayerNorm(d)

    def forward(self, x, r):
        return self.ln(x + r) * 2.0


class RMSNorm(torch.nn.Module):
    """The LLaMA formulation: upcast, mean of squares, rsqrt, scale, cast back."""

    def __init__(self, d: int = 40, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(d))
        self.eps = eps

    def forward(self, x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class Softmax(torch.nn.Module):
    def __init__(self, log: bool = False) -> None:
        super().__init__()
        self.log = log

    def forward(self, x):
        return F.log_softmax(x * 0.5, dim=-1) if self.log else F.softmax(x * 0.5, dim=-1)


class ManualSoftmax(torch.nn.Module):
    """Softmax written out: amax, sub, exp, sum, div — fused by the reduction rule alone."""

    def forward(self, x):
        e = torch.exp(x - x.amax(-1, keepdim=True))
        return e / e.sum(-1, keepdim=True)


class Elementwise(torch.nn.Module):
    """Broadcasting, comparisons, where, casts and transcendental ops in one chain."""

    def forward(self, x, y):
        z = torch.where(x > 0, torch.sigmoid(x) * y, torch.tanh(x) - (x * y).abs())
        return (z * torch.exp(-x * x) + torch.sqrt(x * x + 1.0) * y).to(x.dtype)


class Attention(torch.nn.Module):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def forward(self, q, k, v, lengths):
        if self.mode == "causal":
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if self.mode == "plain":
            return F.scaled_dot_product_attention(q, k, v, scale=0.3)
        n = k.shape[2]
        keep = (
            torch.arange(n, device=q.device)[None, :] < lengths[:, None]
        )  # padding mask, per batch
        mask = keep[:, None, None, :]
        if self.mode == "float":
            mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(
                ~mask, float("-inf")
            )
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class WithFallback(torch.nn.Module):
    """cumsum and flip are in no pattern: they run as ATen calls between fused kernels."""

    def __init__(self, d: int = 24) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(d, d)

    def forward(self, x):
        y = torch.cumsum(self.lin(x), dim=-1)
        return torch.flip(y, dims=[1]) * math.pi + 1.0
