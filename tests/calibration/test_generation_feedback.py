"""Split and streamed layers measured slower than priced: the excess per hand-off, or per
streamed call, joins the cost model."""

from __future__ import annotations

import pytest

from hetero.calibration.generation import split_feedback, stream_feedback, with_split_handoff
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import Objective
from hetero.partitioner.plan import Plan, PlannedPartition


def _plan(*parts: PlannedPartition) -> Plan:
    return Plan(model="m", cluster="c", objective=Objective.LATENCY, algorithm="latency",
                partitions=parts, transfers=(), predicted_ms=0.0)  # fmt: skip


def _split(i: int, predicted: float, host: float, handoffs: int = 4) -> PlannedPartition:
    return PlannedPartition(index=i, nodes=(), groups=(f"layers.{i}",), device="gpu",
                            backend="inductor", weights="split", predicted_ms=predicted,
                            host_ms=host, handoffs=handoffs)  # fmt: skip


def test_host_bound_split_layers_price_their_hand_offs_higher():
    plan = _plan(_split(0, 4.8, 4.0), _split(1, 4.8, 4.0), _split(2, 4.8, 4.0))
    fb = split_feedback(plan, {0: 6.8, 1: 6.4, 2: 7.2}, CostModel(), "c")
    assert fb is not None and fb.partitions == 3
    assert fb.extra_s == pytest.approx((6.8 - 4.0) / 4 / 1e3)
    assert fb.cost_model.split_handoff() == pytest.approx(fb.extra_s)
    assert "split hand-offs measured 0.700 ms" in fb.note()
    # a second round adds to the first
    again = with_split_handoff(fb.cost_model, "c", 1e-4)
    assert again.split_handoff() == pytest.approx(fb.extra_s + 1e-4)


def test_split_layers_that_ran_as_priced_change_nothing():
    plan = _plan(_split(0, 4.8, 4.0), _split(1, 4.8, 4.0))
    assert split_feedback(plan, {0: 4.9, 1: 4.7}, CostModel(), "c") is None
    assert split_feedback(plan, {}, CostModel(), "c") is None


def test_a_higher_hand_off_cost_moves_a_split_toward_the_gpu():
    """What the feedback is for: priced with the measured hand-off cost, a split layer's
    best share puts more rows on the GPU (its host path got longer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.gpu_cpu_split import split_cost
    from hetero.partitioner.phases import capture_lm

    cfg = LlamaConfig(hidden_size=1024, intermediate_size=5632, num_hidden_layers=1,
                      num_attention_heads=8, num_key_value_heads=8, vocab_size=512)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    lm = capture_lm(model, batch=1, max_len=32)
    cluster = ClusterSpec.from_yaml("configs/clusters/h200-sxm-node.yaml")
    group = next(g for g in lm.decode.coarsen(depth=3).groups if g.name == "model.model.layers.0")
    ops = [lm.decode[n] for n in group.nodes]

    def fraction(cm: CostModel) -> float:
        cost = split_cost(lm.decode, group, ops, cluster.device("node0/gpu"),
                          cluster.device("node0/cpu"), cluster, cm, gpu_backend="inductor",
                          cpu_backend="eager")  # fmt: skip
        assert cost is not None
        return cost.fraction

    base = CostModel()
    assert fraction(with_split_handoff(base, cluster.name, 2e-4)) > fraction(base)


def _streamed(i: int, predicted: float, groups: int = 1) -> PlannedPartition:
    return PlannedPartition(index=i, nodes=(), groups=tuple(f"layers.{i}.{k}" for k in range(groups)),
                            device="gpu", backend="inductor", weights="streamed",
                            predicted_ms=predicted)  # fmt: skip


def test_streamed_layers_with_unpriced_host_work_price_their_calls_higher():
    """Run 13's shape: each streamed layer's call took 1.5 ms of host time, priced 0.18."""
    plan = _plan(_streamed(0, 0.18), _streamed(1, 0.18), _streamed(2, 0.36, groups=2),
                 _split(3, 4.8, 4.0))  # fmt: skip
    fb = stream_feedback(plan, {0: 1.5, 1: 1.6, 2: 3.0, 3: 4.8}, CostModel(), "c")
    assert fb is not None and fb.partitions == 3
    assert fb.extra_s == pytest.approx((1.5 - 1.05 * 0.18) / 1e3)  # the median call
    assert fb.cost_model.stream_call() == pytest.approx(fb.extra_s)
    assert fb.cost_model.split_handoff() == 0.0  # the split layer ran as priced: untouched
    assert "streamed layers' calls measured" in fb.note()
    assert stream_feedback(plan, {0: 0.18, 1: 0.17, 2: 0.3}, CostModel(), "c") is None


def test_a_higher_streamed_call_cost_is_priced_into_every_streamed_group():
    """What the feedback is for: the re-plan prices each streamed group's call with it."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.backends.registry import default_registry
    from hetero.calibration.generation import _with_runtime
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.generation import plan_generation
    from hetero.partitioner.phases import capture_lm

    cfg = LlamaConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, vocab_size=512)  # fmt: skip
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg).to(torch.float16).eval()
    lm = capture_lm(model, batch=1, max_len=32)
    cluster = ClusterSpec.from_yaml("configs/clusters/h200-sxm-node.yaml")
    cluster = cluster.with_device("node0/gpu", memory=int(lm.decode.param_bytes * 0.9))
    forced = {f"model.model.layers.{i}": "streamed" for i in range(4)}

    def step_ms(cm: CostModel) -> float:
        gp = plan_generation(lm, cluster, registry=default_registry(), cost_model=cm,
                             decode_placements=forced)  # fmt: skip
        return gp.predicted_decode_ms

    base = CostModel()
    slower = _with_runtime(base, cluster.name, stream_call=1e-3)
    assert step_ms(slower) == pytest.approx(step_ms(base) + 4 * 1.0, rel=0.05, abs=0.5)
