"""Generation on a real GPU: every weight home (resident with its decode step as a CUDA
graph, streamed, split with the host CPU, the CPU) gives transformers' tokens, and an fp16
model's logits stay within 2e-2 of the uncapped model's, teacher-forced.

    python3 -m pytest -q tests/gpu/test_generation_gpu.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

H200 = Path(__file__).resolve().parents[2] / "configs" / "clusters" / "h200-sxm-node.yaml"


def _model(dtype: torch.dtype, dim: int = 256, layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=1024, initializer_range=0.1,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg).to(dtype).eval()
    return model


MIXED = {
    "model.model.layers.1": "streamed",
    "model.model.layers.2": "split",
    "model.model.layers.3": "node0/cpu",
}


# {}: the planner's choice, uncapped: all resident, decode as one CUDA graph
@pytest.mark.parametrize("placements", [{}, MIXED], ids=["resident", "mixed"])
def test_greedy_tokens_equal_transformers(placements, tmp_path):
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm

    model = _model(torch.float32)
    torch.manual_seed(1)
    prompt = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=default_registry(),
        cache_dir=tmp_path, decode_placements=placements or None,
    )  # fmt: skip
    try:
        out = lm.generate(prompt.cpu(), 24)
        assert out.tolist() == ref[:, 16:].cpu().tolist()
        again = lm.generate(prompt.cpu(), 24)  # the cache is reused across requests
        assert again.tolist() == out.tolist()
    finally:
        lm.shutdown()


def test_fp16_logits_teacher_forced_within_2e_2(tmp_path):
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm
    from hetero.partitioner.phases import Phase

    model = _model(torch.float16)
    torch.manual_seed(2)
    prompt = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=12, min_new_tokens=12, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, 16:]
    ref = torch.stack([x[0].float() for x in out.logits])
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=default_registry(),
        cache_dir=tmp_path,
        decode_placements={"model.model.layers.1": "split", "model.model.layers.2": "node0/cpu"},
    )  # fmt: skip
    try:
        g = lm.generation
        with torch.no_grad():
            got = [g.step(Phase.PREFILL, prompt.cpu(), 0)]
            g.move_state()
            for k in range(11):
                step = tokens[k].view(1, 1).cpu()
                got.append(g.step(Phase.DECODE, step, 16 + k))
        got = torch.stack([x[0].float().cpu() for x in got])
        rel = (got - ref.cpu()).norm(dim=-1) / ref.cpu().norm(dim=-1)
        assert float(rel.max()) < 2e-2, rel
    finally:
        lm.shutdown()
