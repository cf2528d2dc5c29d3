"""Capturing a causal LM for generation: both phases, the KV cache as in-place state."""

from __future__ import annotations

import pytest
import torch

from hetero.errors import CaptureError, ConfigError
from hetero.partitioner.phases import PROMPT, Phase, capture_lm
from hetero.partitioner.split import param_values, split


@pytest.fixture(scope="module")
def lm(tiny_llama_lm):
    return tiny_llama_lm


def test_cache_is_state_of_both_phases(lm):
    names = {s.name for s in lm.state}
    assert len(names) == 4  # keys and values of 2 layers
    for graph in (lm.prefill, lm.decode):
        assert graph.state == names
        assert graph.outputs and len(graph.outputs) == 1  # logits only: no cache output
        writers = [op for op in graph if op.state_bytes]
        assert {p for op in writers for p in op.params} == names
        assert all(op.target.endswith("_.default") for op in writers)  # written in place
        assert not any(op.param_bytes and op.state_bytes for op in writers)


def test_prompt_length_is_dynamic_decode_is_one_token(lm):
    assert isinstance(lm.prefill.inputs[PROMPT].shape[1], str)
    assert lm.decode.inputs[PROMPT].shape == (1, 1)


def test_groups_count_state_apart_from_weights(lm):
    groups = lm.decode.coarsen(depth=3)
    layers = [g for g in groups.groups if g.name.endswith(("layers.0", "layers.1"))]
    assert len(layers) == 2
    for g in layers:
        assert g.state_bytes == 2 * 64 * 2 * 16 * 4  # k and v: [1, 2 heads, 64, 16] fp32
        assert g.param_bytes > 0 and not set(g.params) & lm.decode.state


def _run(graph, parts, state, ids, start):
    env = dict(param_values(graph))
    env.update(state)
    env.update({"input_ids": ids, "start": torch.tensor(start)})
    with torch.no_grad():
        for p in parts:
            env.update(zip(p.outputs, p(env), strict=True))
    return env[graph.outputs[0]]


@pytest.mark.parametrize("cuts", [1, 3])
def test_split_programs_generate_like_transformers(tiny_llama, lm, cuts):
    """The captured programs, cut into `cuts` partitions, run a greedy generation with one
    shared cache and give transformers' tokens."""
    _, prompt, expected = tiny_llama
    state = {s.name: torch.zeros(s.shape) for s in lm.state}

    def parts(graph):
        order = list(graph.nodes)
        k = -(-len(order) // cuts)
        return split(graph, {n: i // k for i, n in enumerate(order)})

    pre, dec = parts(lm.prefill), parts(lm.decode)
    logits = _run(lm.prefill, pre, state, prompt, 0)
    tokens = [int(logits.argmax(-1))]
    for k in range(expected.shape[1] - 1):
        logits = _run(lm.decode, dec, state, torch.tensor([[tokens[-1]]]), prompt.shape[1] + k)
        tokens.append(int(logits.argmax(-1)))
    assert tokens == expected[0].tolist()


def test_prompt_longer_than_the_cache_names_the_limit(lm):
    with pytest.raises(ConfigError, match="max_length=64"):
        lm.check_prompt(torch.zeros(1, 60, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(ConfigError, match="batch 1"):
        lm.check_prompt(torch.zeros(2, 4, dtype=torch.long))


def test_a_model_without_a_cache_is_refused():
    with pytest.raises(CaptureError, match="neither a transformers causal LM"):
        capture_lm(torch.nn.Linear(4, 4), max_len=8)


def test_phase_graph_lookup(lm):
    assert lm.graph(Phase.PREFILL) is lm.prefill and lm.graph(Phase.DECODE) is lm.decode


def test_a_sliding_window_shorter_than_the_cache_is_refused_with_what_to_do():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, vocab_size=64,
                        sliding_window=16)  # fmt: skip
    model = MistralForCausalLM(cfg).eval()
    with pytest.raises(CaptureError, match=r"sliding window of 16 .*max_length <= 16"):
        capture_lm(model, max_len=32)
    assert model.config.sliding_window == 16
    capture_lm(model, max_len=16)  # the window covers the cache: full attention
    assert model.config.sliding_window == 16  # the user's config, restored


@pytest.mark.parametrize("max_len", [1, 2])
def test_a_cache_too_short_for_a_prompt_and_a_token_says_so(tiny_llama, max_len):
    with pytest.raises(ConfigError, match=f"max_length={max_len}: .*at least 3"):
        capture_lm(tiny_llama[0], max_len=max_len)
