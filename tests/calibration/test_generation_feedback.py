"""Split layers measured slower than priced: the excess per hand-off joins the cost model."""

from __future__ import annotations

import pytest

from hetero.calibration.generation import split_feedback, with_split_handoff
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
