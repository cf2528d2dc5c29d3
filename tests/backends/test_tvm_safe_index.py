"""TVM's gathers, takes, indexes and scatters never read or write outside their table,
whatever index reaches them (token ids 2^24 and ±2^31 used to kill the process)."""

from __future__ import annotations

import multiprocessing
import pickle

import pytest
import torch

from hetero.backends.registry import default_registry
from hetero.backends.units import units_for
from hetero.partitioner.graph import capture

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm

HOSTILE = [-1, -7, 7, 2**24, 2**31 - 1, -(2**31), 2**31, 2**32 + 3, -(2**40)]


class Lookups(torch.nn.Module):
    """One op of each indexing kind the TVM importer lowers, each fed by `idx`."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(7, 4)
        self.table = torch.nn.Parameter(torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3))

    def forward(self, idx: torch.Tensor, pick: torch.Tensor):
        emb = self.emb(idx)  # take
        sel = torch.index_select(self.table, 0, idx.reshape(-1))  # take on an axis
        adv = self.table[pick]  # index.Tensor (negative indices count from the end)
        gat = torch.gather(self.table, 0, idx.reshape(-1, 1).expand(-1, 3))  # gather_elements
        put = torch.zeros(7).index_put((pick,), torch.ones(pick.shape))  # index_put
        return emb, sel, adv, gat, put


def _model_and_unit(artifact_cache, cpu_device):
    torch.manual_seed(0)
    model = Lookups().eval()
    example = (torch.tensor([[0, 3], [6, 1]]), torch.tensor([2, -1]))
    graph = capture(model, example)
    _, units, _ = units_for(graph, {n: 0 for n in graph.order}, *example)
    tvm = default_registry().get("tvm")
    art = artifact_cache.build(tvm, units[0], cpu_device, _options())
    return model, example, art


def _options():
    from hetero.backends.base import CompileOptions

    return CompileOptions()


def _run_hostile(art_blob: bytes, device_blob: bytes, cases: list) -> list:
    """In a child process: run the artifact on every hostile case, return the outputs."""
    art, device = pickle.loads(art_blob), pickle.loads(device_blob)
    run = default_registry().get("tvm").load(art, device)
    return [[o.clone() for o in run(*case)] for case in cases]


def _child(art_blob, device_blob, cases, queue) -> None:
    queue.put(pickle.dumps(_run_hostile(art_blob, device_blob, cases)))


def test_valid_indices_match_eager(artifact_cache, cpu_device):
    model, example, art = _model_and_unit(artifact_cache, cpu_device)
    run = default_registry().get("tvm").load(art, cpu_device)
    for idx, pick in [example, (torch.tensor([[6, 6], [0, 5]]), torch.tensor([-7, 6]))]:
        with torch.no_grad():
            want = model(idx, pick)
        got = run(idx, pick)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)


def test_hostile_indices_stay_inside_the_table(artifact_cache, cpu_device):
    """Out-of-range ids give the first or last row (validation refuses them before a served
    request runs); the process survives. Run in a child: a wild read would kill pytest."""
    _, _, art = _model_and_unit(artifact_cache, cpu_device)
    cases = [
        (torch.full((2, 2), v, dtype=torch.int64), torch.full((2,), v, dtype=torch.int64))
        for v in HOSTILE
    ]
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    child = ctx.Process(
        target=_child, args=(pickle.dumps(art), pickle.dumps(cpu_device), cases, queue)
    )
    child.start()
    child.join(timeout=240)
    assert child.exitcode == 0, f"the artifact crashed its process (exit code {child.exitcode})"
    outs = pickle.loads(queue.get(timeout=10))
    table = torch.arange(7 * 3, dtype=torch.float32).reshape(7, 3)
    for v, (emb, sel, adv, gat, put) in zip(HOSTILE, outs, strict=True):
        row = min(max(v + 7 if v < 0 else v, 0), 6)  # torch's meaning for -7..6, else clamped
        clamped = min(max(v, 0), 6)  # torch.gather takes no negative index: clamped
        assert torch.isfinite(emb).all() and emb.shape == (2, 2, 4), v
        torch.testing.assert_close(sel, table[[row] * 4], msg=str(v))
        torch.testing.assert_close(adv, table[[row] * 2], msg=str(v))
        torch.testing.assert_close(gat, table[[clamped] * 4], msg=str(v))
        assert put.sum() == 1 and put[row] == 1, v
