"""torch.compile(model, backend="hetero") goes through hetero.compile and matches eager."""

from __future__ import annotations

import pytest
import torch

import hetero.interfaces.api as api
from hetero.interfaces.models import mlp_block


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def test_the_backend_is_registered_by_entry_point():
    assert "hetero" in torch._dynamo.list_backends(exclude_tags=())


def test_torch_compile_with_hetero_matches_eager(monkeypatch):
    calls = []
    real = api.compile

    def spy(*args, **kwargs):
        cm = real(*args, **kwargs)
        # a backend that sizes torch's thread pool while compiling (TVM's does) must not
        # trip dynamo's check that global state is unchanged across the compile
        torch.set_num_threads(1 if threads > 1 else 2)
        calls.append(cm)
        return cm

    threads = torch.get_num_threads()
    monkeypatch.setattr(api, "compile", spy)
    model, (x,) = mlp_block(batch=2, seq=4)
    compiled = torch.compile(model, backend="hetero")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-5)
        y = torch.randn_like(x)
        torch.testing.assert_close(compiled(y), model(y), rtol=1e-4, atol=1e-5)
    assert len(calls) == 1  # one captured graph, planned and compiled by hetero once
    assert torch.get_num_threads() == threads
    assert calls[0].plan.partitions


def test_a_graph_hetero_cannot_take_still_runs(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no plan")

    monkeypatch.setattr(api, "compile", broken)
    model, (x,) = mlp_block(batch=2, seq=4)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, backend="hetero")(x), model(x))
