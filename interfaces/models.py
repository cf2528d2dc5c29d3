"""Small models bundled for the demo and the tests (random weights, nothing downloaded).

Each factory returns (module, example_inputs) — the form a deploy config's
`model: pkg.module:factory` names.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc = nn.Linear(dim, hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x), approximate="tanh"))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    """A GPT-style decoder: token + position embeddings, pre-LN blocks, tied LM head."""

    def __init__(
        self, vocab: int = 512, dim: int = 128, heads: int = 4, layers: int = 4, ctx: int = 128
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tok.weight
        for p in self.parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * layers))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tok(idx) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


class MLPBlock(nn.Module):
    """Linear 256→1024, GELU, Linear 1024→256, residual, LayerNorm (the TVM CPU benchmark's block)."""

    def __init__(self, dim: int = 256, hidden: int = 1024) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(F.gelu(self.fc1(x))))


def tiny_gpt(
    batch: int = 2, seq: int = 64, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The demo model: a 4-layer, 128-wide GPT-style decoder (0.9 M parameters)."""
    torch.manual_seed(seed)
    model = TinyGPT().eval()
    return model, (torch.randint(0, 512, (batch, seq)),)


def mlp_block(
    batch: int = 8, seq: int = 128, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    torch.manual_seed(seed)
    return MLPBlock().eval(), (torch.randn(batch, seq, 256),)


def tiny_llama(
    layers: int = 2, dim: int = 64, vocab: int = 512, prompt: int = 11, seed: int = 0
) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """A tiny LLaMA-architecture causal LM (transformers' LlamaForCausalLM: RMSNorm, rotary,
    SwiGLU, grouped KV heads; 2 layers, 64 wide, fp32, random weights) and a prompt of
    `prompt` tokens: the generation deploy config's model (`task: generate`)."""
    from transformers import LlamaConfig, LlamaForCausalLM  # optional heavy dependency

    cfg = LlamaConfig(
        hidden_size=dim, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, initializer_range=0.2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, vocab, (1, prompt)),)
