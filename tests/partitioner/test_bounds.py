"""Index bounds read off captured graphs: which inputs index a table, through what."""

from __future__ import annotations

import torch
from torch import nn

from hetero.interfaces.models import TinyGPT
from hetero.partitioner.bounds import index_bounds
from hetero.partitioner.graph import capture


def _bounds(model: nn.Module, *example, dynamic_shapes=None):
    return index_bounds(capture(model.eval(), example, dynamic_shapes))


def test_token_ids_and_positions_of_a_gpt():
    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, heads=2, layers=1, ctx=16)
    idx = torch.randint(0, 64, (1, 8))
    b = _bounds(model, idx)
    assert (b.inputs["idx"].low, b.inputs["idx"].high) == (0, 64)
    assert "module tok" in b.inputs["idx"].describe()
    assert not b.dims  # static: no dim to limit

    seq = torch.export.Dim("seq", min=2)  # no max: the position table sets it
    b = _bounds(model, idx, dynamic_shapes={"idx": {1: seq}})
    (limit,) = b.dims.values()
    assert limit.most == 16 and "module pos" in limit.describe()


class Several(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.big = nn.Embedding(100, 4)
        self.small = nn.Embedding(10, 4)
        self.table = nn.Parameter(torch.randn(5, 4))

    def forward(self, a, b, c, d, mask, f):
        x = self.big(a) + self.small(a.int())  # two tables: the smaller one bounds `a`
        y = self.table[b]  # advanced indexing also counts from the end
        z = self.big(c + 1)  # arithmetic: no bound can be read off
        w = self.big(d[:, :1])  # a slice: the other elements may mean something else
        m = self.table[mask]  # a bool mask, not positions
        v = self.small(f.long())  # a float cast to an index
        return x, y, z, w, m, v


def test_views_and_casts_pass_a_bound_arithmetic_and_slices_do_not():
    a, c, d = (torch.tensor([[1, 2]]) for _ in range(3))  # distinct: export merges aliases
    mask = torch.tensor([True, False, True, False, True])
    b = _bounds(Several(), a, torch.tensor([0, -1]), c, d, mask, torch.tensor([1.0]))
    assert set(b.inputs) == {"a", "b", "f"}
    assert (b.inputs["a"].low, b.inputs["a"].high) == (0, 10)
    assert len(b.inputs["a"].uses) == 2
    assert (b.inputs["b"].low, b.inputs["b"].high) == (-5, 5)
    assert (b.inputs["f"].low, b.inputs["f"].high) == (0, 10)


class Gathers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(6, 3))

    def forward(self, rows, cols):
        g = torch.gather(self.table, 1, cols.reshape(-1, 1).expand(-1, 2))
        s = torch.index_select(self.table, 0, rows)
        return g, s


def test_gather_and_index_select_bound_by_their_dim():
    b = _bounds(Gathers(), torch.tensor([0, 5]), torch.tensor([1, 2]))
    assert (b.inputs["rows"].low, b.inputs["rows"].high) == (0, 6)
    assert (b.inputs["cols"].low, b.inputs["cols"].high) == (0, 3)
