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


def _reference(model, steps: int = 12):
    """(a 16-token prompt, transformers' greedy tokens after it, their logits on the host)."""
    torch.manual_seed(2)
    prompt = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )  # fmt: skip
    tokens = out.sequences[0, prompt.shape[1] :]
    return prompt, tokens, torch.stack([x[0].float() for x in out.logits]).cpu()


def _greedy(model, *, batch: int, new: int, seed: int = 3):
    """(`batch` random 16-token prompts, transformers' greedy continuation of each)."""
    torch.manual_seed(seed)
    prompt = torch.randint(0, 1024, (batch, 16), device="cuda")
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False)
    return prompt, ref


def _teacher_forced_error(lm, prompt, tokens, ref) -> torch.Tensor:
    """Per step, hetero's logits against `ref` (the reference's, on its own `tokens`)."""
    from hetero.partitioner.phases import Phase

    g = lm.generation
    with torch.no_grad():
        got = [g.step(Phase.PREFILL, prompt.cpu(), 0)]
        g.move_state()
        for k in range(len(ref) - 1):
            got.append(g.step(Phase.DECODE, tokens[k].view(1, 1).cpu(), prompt.shape[1] + k))
    got = torch.stack([x[0].float().cpu() for x in got])
    return (got - ref).norm(dim=-1) / ref.norm(dim=-1)


MIXED = {
    "model.model.layers.1": "streamed",
    "model.model.layers.2": "split",
    "model.model.layers.3": "node0/cpu",
}


# {}: the planner's choice, uncapped: all resident, decode as one CUDA graph
@pytest.mark.parametrize("placements", [{}, MIXED], ids=["resident", "mixed"])
def test_greedy_tokens_equal_transformers(placements, tmp_path, monkeypatch):
    from torch._dynamo.utils import counters

    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm

    model = _model(torch.float32)
    torch.manual_seed(1)
    prompt = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    # a cache of this test's own: a hit is a warming's compile (runtime/stage_warming.py)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    before = dict(counters["inductor"])
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=default_registry(),
        cache_dir=tmp_path, decode_placements=placements or None,
    )  # fmt: skip
    cached = {k: counters["inductor"][k] - before.get(k, 0) for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}  # fmt: skip
    try:
        if not placements:  # prefill and decode, each compiled by a warming first
            assert cached["fxgraph_cache_hit"] >= 2 and not cached["fxgraph_cache_miss"], cached
        out = lm.generate(prompt.cpu(), 24)
        assert out.tolist() == ref[:, 16:].cpu().tolist()
        again = lm.generate(prompt.cpu(), 24)  # the cache is reused across requests
        assert again.tolist() == out.tolist()
        if placements:  # the split layer's hand-offs timed on the GPU's timeline
            from hetero.interfaces.feedback import measured_partitions
            from hetero.partitioner.phases import Phase

            runs = measured_partitions(*lm.generation.measured(Phase.DECODE))
            split = [p.index for p in lm.plan.decode.partitions if p.weights == "split"]
            assert split and all(runs[k].cpu_rows_ms > 0 for k in split)
            assert all(m.cpu_rows_ms is None for k, m in runs.items() if k not in split)
        if not placements:  # all resident: prefill compiled once for any prompt length
            from hetero.partitioner.phases import Phase

            # each decode step queued before the last token was read, and still every
            # step's GPU time recorded: 2 requests of 23 steps (the first run cold), at least
            decode = lm.generation.executors[Phase.DECODE]
            stats = decode.metrics.snapshot().stages
            assert stats and all(st.runs >= 2 * 23 - 1 and st.stage_ms > 0 for st in stats)
            assert not decode._unread  # reading the metrics read every run
            # the logits stay on the GPU that made them; the next token is sampled there
            logits = lm.generation.step(Phase.DECODE, out[:, :1].cuda(), 16)
            assert logits.device.type == "cuda"
            short = prompt[:, :9]
            with torch.no_grad():
                ref = model.generate(short, max_new_tokens=8, min_new_tokens=8, do_sample=False)
            assert lm.generate(short.cpu(), 8).tolist() == ref[:, 9:].cpu().tolist()
    finally:
        lm.shutdown()


def test_a_batch_of_prompts_through_op_by_op_gpu_stages_equals_transformers(tmp_path):
    """Four prompts at once, the GPU's stages run op by op (as a streamed prefill's are) on
    programs traced on the host: the 7B at batch 16 stopped there at a `view` the GPU's
    attention layout broke (run 19; backends/reshape_views.py)."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm
    from hetero.runtime.generation import StageBinder

    model = _model(torch.float16)
    prompt, ref = _greedy(model, batch=4, new=8)
    registry = default_registry()
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, batch_size=4, registry=registry,
        cache_dir=tmp_path, decode_placements={"model.model.layers.1": "streamed"},
        binder=StageBinder(registry, compile_gpu=False),
    )  # fmt: skip
    try:
        out = lm.generate(prompt.cpu(), 8)
        # float16: a near tie may flip a late token; the first ones must agree
        assert out[:, :4].tolist() == ref[:, 16:20].cpu().tolist()
    finally:
        lm.shutdown()


def test_fp16_logits_teacher_forced_within_2e_2(tmp_path):
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm

    model = _model(torch.float16)
    prompt, tokens, ref = _reference(model)
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=default_registry(),
        cache_dir=tmp_path,
        decode_placements={"model.model.layers.1": "split", "model.model.layers.2": "node0/cpu"},
    )  # fmt: skip
    try:
        rel = _teacher_forced_error(lm, prompt, tokens, ref)
        assert float(rel.max()) < 2e-2, rel
    finally:
        lm.shutdown()


AROUND_CPU = {"model.model.layers.0": "streamed", "model.model.layers.1": "streamed",
              "model.model.layers.2": "node0/cpu", "model.model.layers.3": "streamed"}  # fmt: skip
AROUND_SPLIT = {**AROUND_CPU, "model.model.layers.2": "split"}


@pytest.mark.parametrize("placements", [AROUND_CPU, AROUND_SPLIT], ids=["cpu", "split"])
def test_streamed_layers_replayed_as_graphs_per_slot_give_transformers_tokens(placements, tmp_path):
    """Three streamed layers (an odd count: each one's slot alternates from step to step)
    around a CPU or a split layer, replayed as CUDA graphs (StageBinder(graph_streamed=True)):
    the same tokens as transformers, request after request; every capture held, the split
    stage (whose hand-offs wait on the host) launched, and the GPU's generator still draws
    (run 39: after a split stage's capture it raised)."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm
    from hetero.partitioner.phases import Phase
    from hetero.runtime.cuda_graph import SlotGraphs
    from hetero.runtime.generation import StageBinder

    model = _model(torch.float32)
    torch.manual_seed(3)
    prompt = torch.randint(0, 1024, (1, 16), device="cuda")
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=24, min_new_tokens=24, do_sample=False)
    registry = default_registry()
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=registry,
        cache_dir=tmp_path, binder=StageBinder(registry, graph_streamed=True),
        decode_placements=placements,
    )  # fmt: skip
    try:
        for _ in range(2):
            out = lm.generate(prompt.cpu(), 24)
            assert out.tolist() == ref[:, 16:].cpu().tolist()
        decode = lm.generation.executors[Phase.DECODE]
        runners = [(s, decode.runner(s.index)) for s in decode.stages]
        graphed = [(s, r.fn) for s, r in runners if isinstance(getattr(r, "fn", None), SlotGraphs)]
        assert {s.weights for s, _ in graphed} == {"streamed"}
        assert len(graphed) == sum(s.weights == "streamed" for s, _ in runners)
        assert all(g.failed is None and 1 <= len(g.graphs) <= 2 for _, g in graphed)
        assert torch.randn(4, device="cuda").isfinite().all()
    finally:
        lm.shutdown()


def test_float16_model_with_bfloat16_cpu_layers_within_2e_2(tmp_path):
    """The host CPU's layers in bfloat16 copies (a profile that measured bfloat16 faster):
    logits teacher-forced within 2e-2 of transformers' float16 run on the GPU."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import compile_lm
    from hetero.partitioner.cost import CostModel

    model = _model(torch.float16)
    prompt, tokens, ref = _reference(model)
    rates = (Efficiency("matmul/float16", 0.3, 0.3), Efficiency("matmul/bfloat16", 0.6, 0.6))
    host = DeviceProfile("node0/cpu", "cpu", efficiency=rates, backend="eager")
    cm = CostModel(profile=CalibrationProfile(cluster="h200-sxm-node", devices=(host,)))
    lm = compile_lm(
        model, ClusterSpec.from_yaml(H200), max_length=64, registry=default_registry(),
        cache_dir=tmp_path, cost_model=cm, host_precision="fastest",
        decode_placements={"model.model.layers.1": "node0/cpu", "model.model.layers.2": "node0/cpu"},
    )  # fmt: skip
    try:
        assert {p.cpu_dtype for p in lm.plan.decode.partitions if p.device == "node0/cpu"} == {
            "bfloat16"
        }
        rel = _teacher_forced_error(lm, prompt, tokens, ref)
        assert float(rel.max()) < 2e-2, rel
    finally:
        lm.shutdown()
