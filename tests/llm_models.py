"""Small causal LMs for the generation tests, built from configs (nothing downloaded)."""

from __future__ import annotations

import functools

import torch


def llama_lm(layers: int = 2, dim: int = 64, vocab: int = 512, seed: int = 0):
    """A tiny LLaMA-architecture causal LM (RMSNorm, rotary, SwiGLU, grouped KV heads), fp32.
    A wide init spreads its logits, so greedy tokens vary and near-ties are rare."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=dim, intermediate_size=176, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=vocab, initializer_range=0.2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


@functools.cache
def captured_llama(dtype: torch.dtype = torch.float32, max_len: int = 64):
    """llama_lm() in `dtype` captured for generation (batch 1), once per session: a capture
    costs seconds, and the tests that share it only read the graphs. One cache length (64,
    what the generation tests need for 11 + 32 tokens) for every module, so a pytest process
    captures each dtype once (tests/conftest.py's tiny_llama_lm is the float32 one)."""
    from hetero.partitioner.phases import capture_lm

    return capture_lm(llama_lm().to(dtype), batch=1, max_len=max_len)


@functools.cache
def captured_wide_llama(dtype: torch.dtype = torch.float32, layers: int = 4):
    """A LLaMA of ~4 MiB layers (float32; hidden 256, MLP 1024), large enough to be worth
    splitting, captured for generation (batch 1, 64 positions), once per process: the
    planning tests of several modules read it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.partitioner.phases import capture_lm

    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return capture_lm(LlamaForCausalLM(cfg).to(dtype).eval(), batch=1, max_len=64)


@functools.cache
def captured_big_llama():
    """Two layers of 50 MB (float16, built on the meta device: no weights in memory), where a
    decode step is bound by the bytes it reads, captured for generation (batch 1, 64
    positions), once per process."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.partitioner.phases import capture_lm

    cfg = LlamaConfig(
        hidden_size=1024, intermediate_size=5632, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=8, vocab_size=512,
    )  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    return capture_lm(model, batch=1, max_len=64)
