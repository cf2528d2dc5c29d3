"""The split stage's program: matmuls rewritten to run partly on the GPU, partly on the CPU,
compute what they computed (here both shares run on the CPU, through the same op)."""

from __future__ import annotations

import pytest
import torch

from hetero.partitioner.graph import capture
from hetero.runtime.split_linear import gpu_rows, shares, split_program


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 48, bias=False)
        self.k = torch.nn.Linear(32, 16, bias=True)  # addmm
        self.o = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.cat([self.q(x), self.k(x)], dim=-1).relu())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_split_program_computes_the_same(fraction):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(3, 32)
    graph = capture(block, (x,))
    gm = graph.program.graph_module
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    params = {name: graph.program.state_dict[fqn] for name, (fqn, _) in graph.params.items()}
    rows = {n: params[n].shape[0] for n in names if n in params and params[n].dim() == 2}
    module, inputs, groups = split_program(gm, names, fraction, rows)
    assert len(groups) == 2  # q and k share x: one hand-off; o another
    assert sum(len(g.weights) for g in groups) == 3
    gpu, cpu = shares(params, groups)
    values = {**params, **gpu, **cpu, names[-1]: x}
    (out,) = module(*[values[n] for n in inputs])
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)


def test_gpu_rows_keep_tiles_on_real_layers():
    assert gpu_rows(4096, 0.45) % 64 == 0
    assert gpu_rows(48, 0.5) == 24
    assert gpu_rows(100, 0.0) == 0 and gpu_rows(100, 1.0) == 100
