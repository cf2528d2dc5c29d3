"""Folding spelled-out Linears back into `aten.linear` (op-by-op runs). The programs are
decomposed to core ATen, as hetero's partitions are (a Linear: view, permute, addmm, view)."""

from __future__ import annotations

import pytest
import torch

from hetero.backends.export import runnable
from hetero.backends.linear_fold import fold_linears


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) + x


def _ops(gm: torch.fx.GraphModule) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


@pytest.mark.parametrize("shape", [(5, 16), (2, 7, 16)], ids=["2d", "3d"])
def test_every_linear_becomes_one_op_with_the_same_values(shape):
    torch.manual_seed(0)
    block, x = _Block().eval(), torch.randn(shape)
    ep = torch.export.export(block, (x,), strict=False).run_decompositions()
    gm = runnable(ep)
    before = _ops(gm)
    assert fold_linears(gm) == 2
    after = _ops(gm)
    assert after.count("aten.linear.default") == 2
    assert not {"aten.mm.default", "aten.addmm.default", "aten.permute.default"} & set(after)
    assert len(after) < len(before)
    assert torch.equal(gm(x), runnable(ep)(x))  # the same kernels: bit for bit


def test_a_symbolic_length_folds_too():
    block, x = _Block().eval(), torch.randn(2, 7, 16)
    dim = torch.export.Dim("n", min=2, max=64)
    ep = torch.export.export(
        block, (x,), dynamic_shapes=({1: dim},), strict=False
    ).run_decompositions()
    gm = runnable(ep)
    assert fold_linears(gm) == 2
    longer = torch.randn(2, 11, 16)
    assert torch.equal(gm(longer), runnable(ep)(longer))


def test_a_matmul_that_is_no_linear_stays():
    class Scaled(torch.nn.Module):
        def forward(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            # addmm with beta: not what a Linear writes
            return torch.addmm(x[:, :3], x, w.t(), beta=0.5)

    x, w = torch.randn(4, 5), torch.randn(3, 5)
    ep = torch.export.export(Scaled(), (x, w), strict=False)
    gm = runnable(ep)
    assert fold_linears(gm) == 0
    assert torch.equal(gm(x, w), runnable(ep)(x, w))
