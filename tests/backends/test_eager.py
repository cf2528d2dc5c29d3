"""The eager reference backend: a .pt2 artifact that reproduces the partition exactly."""

from __future__ import annotations

import torch

from hetero.backends.base import CompileOptions
from hetero.backends.eager import EagerBackend
from hetero.backends.units import contiguous_cut, units_for
from hetero.cluster.models import tiny_gpt
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
