"""Runnable partitions: any acyclic assignment, run in order, reproduces the model."""

from __future__ import annotations

import networkx as nx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils import _pytree as pytree

from hetero.errors import PartitionError
from hetero.partitioner import capture, run_partitions, split


@pytest.fixture(scope="module")
def captured(request):
    cache = {}

    def get(name):
        if name not in cache:
            model, inputs = request.getfixturevalue(name)
            with torch.no_grad():
                ref = model(*inputs)
            cache[name] = (model, inputs, capture(model, inputs), ref)
        return cache[name]

    return get


def _random_assignment(graph, data) -> dict[str, int]:
    """A random topological order (random priorities), cut into 1-5 contiguous runs."""
    keys = data.draw(st.lists(st.integers(0, 1000), min_size=len(graph), max_size=len(graph)))
    prio = dict(zip(graph.order, keys, strict=True))
    order = list(nx.lexicographical_topological_sort(graph.graph, key=lambda n: prio[n]))
    k = data.draw(st.integers(1, 5))
    cuts = sorted(
        set(data.draw(st.lists(st.integers(1, len(order) - 1), min_size=k - 1, max_size=k - 1)))
    )
    assignment, part = {}, 0
    for i, n in enumerate(order):
        if cuts and part < len(cuts) and i == cuts[part]:
            part += 1
        assignment[n] = part
    return assignment


def _assert_same(out, ref):
    flat_out, spec_out = pytree.tree_flatten(out)
    flat_ref, spec_ref = pytree.tree_flatten(ref)
    assert spec_out == spec_ref
    assert len(flat_out) == len(flat_ref)
    for a, b in zip(flat_out, flat_ref, strict=True):
        if isinstance(b, torch.Tensor):
            assert a.shape == b.shape and a.dtype == b.dtype
            rel = (a - b).abs().max() / b.abs().max().clamp_min(1e-12)
            assert rel < 1e-5, rel


@pytest.mark.parametrize("name", ["tiny_gpt", "mlp", "gpt2", "bert"])
@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_random_partitionings_reproduce_eager(name, captured, data):
    _, inputs, graph, ref = captured(name)
    assignment = _random_assignment(graph, data)
    parts = split(graph, assignment)
    assert len(parts) == len(set(assignment.values()))
    assert sorted(n for p in parts for n in p.nodes) == sorted(graph.order)
    for (
        p
    ) in parts:  # explicit inputs: nothing read that no earlier partition or the caller provides
        assert set(p.params) <= set(graph.params)
    _assert_same(run_partitions(graph, parts, *inputs), ref)


def test_partition_inputs_come_from_earlier_partitions(captured):
    _, _, graph, _ = captured("tiny_gpt")
    n = len(graph.order)
    parts = split(graph, {name: i * 3 // n for i, name in enumerate(graph.order)})
    available = set(graph.inputs) | set(graph.params)
    for p in parts:
        assert set(p.arg_names) <= available
        available |= set(p.outputs)
    assert set(o for o in graph.outputs if o) <= available


def test_cyclic_assignment_is_rejected_naming_nodes(captured):
    _, _, graph, _ = captured("mlp")
    chain = [n for n in graph.order if graph[n].op_class != "view"]
    assignment = {n: 0 for n in graph.order}
    # first and last compute op in partition 0, everything between in partition 1: 0 -> 1 -> 0
    for n in graph.order[graph.order.index(chain[1]) : graph.order.index(chain[-1])]:
        assignment[n] = 1
    with pytest.raises(PartitionError) as info:
        split(graph, assignment)
    msg = str(info.value)
    assert "cycle" in msg and "partition 0" in msg and "partition 1" in msg
    assert any(n in msg for n in graph.order)


def test_missing_nodes_are_listed(captured):
    _, _, graph, _ = captured("mlp")
    assignment = {n: 0 for n in graph.order[:-2]}
    with pytest.raises(PartitionError, match="have no partition"):
        split(graph, assignment)
