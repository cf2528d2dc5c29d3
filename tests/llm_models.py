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
