"""The eager reference backend: a .pt2 artifact that reproduces the partition exactly."""

from __future__ import annotations

import pytest
import torch

from hetero.backends.base import CompileOptions
from hetero.backends.eager import EagerBackend
from hetero.backends.units import contiguous_cut, units_for
from hetero.interfaces.models import tiny_gpt
from hetero.partitioner.graph import capture


def test_every_partition_round_trips(artifact_cache, cpu_device, outputs_match):
    m, args = tiny_gpt(batch=1, seq=16)
    graph = capture(m, args)
    _, units, env = units_for(graph, contiguous_cut(graph, 3), *args)
    backend = EagerBackend()
    for unit in units:
        art = artifact_cache.build(backend, unit, cpu_device, CompileOptions())
        assert art.manifest["backend"] == "eager" and not art.manifest["emulated"]
        outputs_match(unit, backend.load(art, cpu_device)(*unit.example_inputs), env, 1e-6)


def test_partitions_chain_to_the_model_output(artifact_cache, cpu_device):
    m, args = tiny_gpt(batch=1, seq=16)
    graph = capture(m, args)
    _, units, env = units_for(graph, contiguous_cut(graph, 2), *args)
    backend = EagerBackend()
    runners = [
        backend.load(artifact_cache.build(backend, u, cpu_device, CompileOptions()), cpu_device)
        for u in units
    ]
    vals = dict(env)
    for unit, run in zip(units, runners, strict=True):
        vals.update(zip(unit.outputs, run(*[vals[a] for a in unit.inputs]), strict=True))
    with torch.no_grad():
        want = m(*args)
    torch.testing.assert_close(vals[graph.outputs[0]], want)


def test_inputs_reach_the_program_in_the_strides_it_was_traced_with():
    """A captured graph's views assume the example's strides; a value handed over
    contiguous (another artifact's output, a serialised copy) is re-strided, not misread."""
    from hetero.backends.eager import restride, traced_strides

    class Flat(torch.nn.Module):
        def forward(self, x):
            return (x.permute(1, 0).reshape(-1),)

    example = torch.arange(12.0).reshape(4, 3).t()  # (3, 4), strides (1, 3)
    # core ATen, as hetero captures: the reshape becomes a view, valid for these strides only
    ep = torch.export.export(Flat(), (example,), strict=False).run_decompositions()
    assert traced_strides(ep) == [(1, 3)]
    same_values = example.contiguous()  # strides (4, 1)
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ep.module()(same_values)
    (got,) = ep.module()(*restride((same_values,), traced_strides(ep)))
    assert torch.equal(got, Flat()(example)[0])


def test_a_scalar_parameter_is_hashed_and_compiled(artifact_cache, cpu_device, outputs_match):
    """A 0-dim weight (a learned scale, as in Swin's attention) hashes by its bytes: viewing
    it as bytes needs one dim (torch refuses to view a 0-dim float as uint8)."""

    class Scaled(torch.nn.Module):
        def __init__(self, scale: float):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(8, 8)
            self.scale = torch.nn.Parameter(torch.tensor(scale))

        def forward(self, x):
            return self.lin(x) * self.scale

    args = (torch.randn(2, 8),)

    def unit_of(scale: float):
        graph = capture(Scaled(scale).eval(), args)
        _, units, env = units_for(graph, contiguous_cut(graph, 1), *args)
        return units[0], env

    unit, env = unit_of(2.5)
    assert unit.graph_hash() != unit_of(3.0)[0].graph_hash()  # the scalar's value is in the key
    art = artifact_cache.build(EagerBackend(), unit, cpu_device, CompileOptions())
    outputs_match(unit, EagerBackend().load(art, cpu_device)(*unit.example_inputs), env, 1e-6)


@pytest.mark.parametrize("dynamic", [False, True])
def test_a_value_arriving_dense_is_relaid_as_the_program_traced_it(dynamic):
    """A program traced on a permuted view (as a partition's input is where the producer's
    permute was the cut) fails its `view` on the dense tensor another backend returns
    (TVM's outputs are dense); relayout puts it back, with a symbolic length too."""
    from hetero.backends.eager import relayout, traced_layouts

    class Merge(torch.nn.Module):
        def forward(self, x):
            return x.transpose(1, 2).view(x.shape[0], x.shape[2], -1)

    x = torch.randn(2, 4, 7, 5).transpose(1, 2)  # [2, 7, 4, 5], traced as a view
    dims = ({1: torch.export.Dim("n", min=2, max=64)},) if dynamic else None
    ep = torch.export.export(Merge(), (x,), dynamic_shapes=dims)
    (order,) = traced_layouts(ep)
    assert order == (0, 2, 1, 3)
    dense = x.contiguous()
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        ep.module()(dense)
    fixed = relayout(dense, order)
    assert torch.equal(ep.module()(fixed), Merge()(x))
    assert relayout(x, order) is x  # already as traced: no copy
