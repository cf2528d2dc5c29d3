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


# ---- modern models: transformers decoders built from config objects, conv blocks ---------------


def decoder(family: str, layers: int = 1, dim: int = 64, heads: int = 4, kv_heads: int = 2,
            inter: int = 128, vocab: int = 128, ctx: int = 64, **extra) -> torch.nn.Module:  # fmt: skip
    """A transformers decoder (`family`: Llama, Qwen2, Mistral) from its config object:
    RMSNorm, rotary embeddings, SwiGLU MLP and grouped-query attention, random weights."""
    import transformers

    cfg = getattr(transformers, f"{family}Config")(
        hidden_size=dim, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab,
        max_position_embeddings=ctx, use_cache=False, **extra,
    )  # fmt: skip
    torch.manual_seed(0)
    return getattr(transformers, f"{family}Model")(cfg).eval()


class _TensorCache:
    """The part of transformers' Cache that an attention layer calls (`update`), over KV
    tensors passed in and returned, as a static cache of a captured decode step holds them."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor) -> None:
        self.keys, self.values, self.pos = keys, values, pos

    def update(self, k, v, layer_idx, *args, **kwargs):
        self.keys = self.keys.index_copy(2, self.pos, k)
        self.values = self.values.index_copy(2, self.pos, v)
        return self.keys, self.values


class LlamaDecodeStep(torch.nn.Module):
    """One-token decode through a transformers LlamaDecoderLayer against a static KV cache of
    `max_len` positions, `pos + 1` of them valid (the mask says which)."""

    def __init__(self, dim: int = 64, heads: int = 4, kv_heads: int = 2, inter: int = 128,
                 max_len: int = 64) -> None:  # fmt: skip
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import (
            LlamaDecoderLayer,
            LlamaRotaryEmbedding,
        )

        cfg = LlamaConfig(
            hidden_size=dim, intermediate_size=inter, num_attention_heads=heads,
            num_key_value_heads=kv_heads, max_position_embeddings=max_len, num_hidden_layers=1,
        )  # fmt: skip
        cfg._attn_implementation = "sdpa"
        torch.manual_seed(0)
        self.layer = LlamaDecoderLayer(cfg, 0)
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.max_len = max_len

    def forward(self, x, pos, keys, values):
        b = x.shape[0]
        cache = _TensorCache(keys, values, pos)
        position_ids = pos[None, :].expand(b, 1)
        emb = self.rotary(x, position_ids)
        valid = torch.arange(self.max_len, device=x.device) <= pos
        mask = valid[None, None, None, :].expand(b, 1, 1, self.max_len)
        h = self.layer(x, attention_mask=mask, position_ids=position_ids,
                       past_key_values=cache, position_embeddings=emb)  # fmt: skip
        return h, cache.keys, cache.values

    def inputs(self, batch: int, pos: int, dtype=torch.float32) -> tuple[torch.Tensor, ...]:
        attn = self.layer.self_attn
        hk = attn.config.num_key_value_heads
        g = torch.Generator().manual_seed(pos)
        x = torch.randn(batch, 1, attn.config.hidden_size, generator=g).to(dtype)
        kv = [torch.randn(batch, hk, self.max_len, attn.head_dim, generator=g).to(dtype)
              for _ in range(2)]  # fmt: skip
        return x, torch.tensor([pos]), *kv


class MobileBlock(torch.nn.Module):
    """A MobileNetV3-style inverted residual: 1x1 expand + BN + hardswish, 3x3 depthwise + BN
    + ReLU6, 1x1 project + BN, residual add (what torchvision's mobilenet_v3 blocks export to)."""

    def __init__(self, c: int = 8, e: int = 16) -> None:
        super().__init__()
        nn = torch.nn
        self.expand, self.bn1 = nn.Conv2d(c, e, 1, bias=False), nn.BatchNorm2d(e)
        self.dw, self.bn2 = nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False), nn.BatchNorm2d(e)
        self.project, self.bn3 = nn.Conv2d(e, c, 1, bias=False), nn.BatchNorm2d(c)
        g = torch.Generator().manual_seed(0)
        for bn in (self.bn1, self.bn2, self.bn3):  # non-trivial inference statistics
            bn.running_mean.copy_(torch.randn(bn.num_features, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.weight.data.copy_(torch.rand(bn.num_features, generator=g) + 0.5)
            bn.bias.data.copy_(torch.randn(bn.num_features, generator=g) * 0.1)

    def forward(self, x):
        y = F.hardswish(self.bn1(self.expand(x)))
        y = F.relu6(self.bn2(self.dw(y)))
        return x + self.bn3(self.project(y))


class ConvNeXtBlock(torch.nn.Module):
    """A ConvNeXt block: 7x7 depthwise conv, channels-last LayerNorm, pointwise MLP with GELU,
    layer scale, residual (torchvision's CNBlock without stochastic depth)."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.dw = torch.nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = torch.nn.LayerNorm(c, eps=1e-6)
        self.up, self.down = torch.nn.Linear(c, 4 * c), torch.nn.Linear(4 * c, c)
        self.scale = torch.nn.Parameter(torch.full((c,), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.down(F.gelu(self.up(self.norm(y)))) * self.scale
        return x + y.permute(0, 3, 1, 2)


class ConvStem(torch.nn.Module):
    """conv + bias + BN + ReLU, then conv + BN + GELU + residual: the epilogues in a row."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        nn = torch.nn
        self.c1, self.b1 = nn.Conv2d(3, c, 3, stride=2, padding=1), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        g = torch.Generator().manual_seed(1)
        for bn in (self.b1, self.b2):
            bn.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
            bn.running_var.copy_(torch.rand(c, generator=g) + 0.5)

    def forward(self, x):
        y = torch.relu(self.b1(self.c1(x)))
        return y + F.gelu(self.b2(self.c2(y)))
