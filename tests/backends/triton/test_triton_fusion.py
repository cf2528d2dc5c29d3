"""The fusion pass and weight folding, checked on the plan they produce (no kernel runs)."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F
from triton_models import (
    Attention,
    Elementwise,
    LayerNormResidual,
    LinearEpilogue,
    ManualSoftmax,
    RMSNorm,
    WithFallback,
    unit_of,
)

from hetero.backends.triton.backend import _propagate
from hetero.backends.triton.fold import fold_weights
from hetero.backends.triton.fuse import fuse
from hetero.backends.triton.patterns import RULES, Fallback

aten = torch.ops.aten


def plan_of(model, *args):
    unit = unit_of(model, *args)
    folded = fold_weights(unit.module, unit.inputs, unit.param_values)
    _propagate(folded.module, (*unit.example_inputs, *(t for _, t in folded.weights)))
    return fuse(folded.module), folded


def kinds(plan) -> list[str]:
    return [s.kind for s in plan.steps]


def targets(step) -> set:
    return {n.target for n in step.nodes}


def test_rules_are_ordered_with_fallback_last():
    assert isinstance(RULES[-1], Fallback)
    names = [r.name for r in RULES]
    # most specific first: attention kinds, then matmul kinds, then row kernels, elementwise
    assert names.index("decode") < names.index("attention") < names.index("matmul")
    assert names.index("gated") < names.index("matmul") < names.index("rmsnorm")
    assert names.index("rmsnorm") < names.index("reduction") < names.index("elementwise")


def test_matmul_takes_bias_activation_residual_and_cast():
    plan, _ = plan_of(LinearEpilogue("tanh"), torch.randn(2, 5, 32))
    mm = [s for s in plan.steps if s.kind == "matmul"]
    assert len(mm) == 2
    assert {aten.addmm.default, aten.gelu.default} <= targets(mm[0])
    assert aten.add.Tensor in targets(mm[1])  # the residual add rides in the epilogue
    assert plan.kernels() == 2


def test_layernorm_fuses_its_producer_and_consumer():
    plan, _ = plan_of(LayerNormResidual(), torch.randn(3, 40), torch.randn(3, 40))
    assert kinds(plan) == ["rowwise"]
    assert {aten.add.Tensor, aten.native_layer_norm.default, aten.mul.Tensor} <= targets(
        plan.steps[0]
    )


def test_rmsnorm_is_one_row_kernel():
    plan, _ = plan_of(RMSNorm(), torch.randn(2, 3, 40))
    assert kinds(plan) == ["rowwise"]
    assert aten.mean.dim in targets(plan.steps[0])


def test_written_out_softmax_is_one_row_kernel():
    plan, _ = plan_of(ManualSoftmax(), torch.randn(4, 33))
    assert kinds(plan) == ["rowwise"]


def test_elementwise_chain_is_one_kernel():
    plan, _ = plan_of(Elementwise(), torch.randn(3, 17), torch.randn(17))
    assert kinds(plan) == ["pointwise"]


@pytest.mark.parametrize("mode", ["causal", "bool"])
def test_attention_is_one_kernel(mode):
    q = torch.randn(2, 2, 8, 16)
    plan, _ = plan_of(Attention(mode), q, q, q, torch.tensor([8, 5]))
    att = [s for s in plan.steps if s.kind == "attention"]
    assert len(att) == 1 and targets(att[0]) == {aten.scaled_dot_product_attention.default}


def test_ops_outside_patterns_run_as_aten_between_kernels():
    plan, _ = plan_of(WithFallback(), torch.randn(2, 3, 24))
    aten_targets = {s.anchor.target for s in plan.steps if s.kind == "aten"}
    assert aten.cumsum.default in aten_targets and aten.flip.default in aten_targets
    assert "matmul" in kinds(plan) and "pointwise" in kinds(plan)


def test_transposed_weights_are_stored_pretransposed_and_contiguous():
    class Lin(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(8, 12)

        def forward(self, x):
            return self.lin(x)

    model = Lin()
    lin = model.lin
    _, folded = plan_of(model, torch.randn(3, 8))
    (w,) = [t for _, t in folded.weights if t.dim() == 2]
    assert w.shape == (8, 12) and w.is_contiguous()
    torch.testing.assert_close(w, lin.weight.detach().t())


def test_a_constant_causal_mask_becomes_is_causal():
    class Masked(torch.nn.Module):
        def forward(self, q):
            n = q.shape[2]
            mask = torch.ones(n, n, dtype=torch.bool).tril()
            return F.scaled_dot_product_attention(q, q, q, attn_mask=mask)

    plan, folded = plan_of(Masked(), torch.randn(1, 2, 8, 16))
    (att,) = [s for s in plan.steps if s.kind == "attention"]
    assert att.anchor.kwargs.get("is_causal") is True
    assert not folded.weights  # the mask is gone, not stored


def test_plan_table_names_every_node():
    plan, _ = plan_of(LinearEpilogue("none"), torch.randn(2, 32))
    table = plan.table()
    assert "addmm" in table and "matmul" in table
