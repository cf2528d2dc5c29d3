"""verify(): stages against eager; a miscompiled op is found by partition and by op."""

from __future__ import annotations

from rt_helpers import make_stages, thirds

from hetero.backends.base import CompileOptions
from hetero.backends.registry import default_registry
from hetero.partitioner.split import split
from hetero.runtime.build import compile_partitions
from hetero.runtime.testing import EXTRA_BACKENDS
from hetero.runtime.verify import verify


def test_matching_stages_verify_ok(mlp, cluster, cache_dir):
    _, x, graph = mlp
    stages = make_stages(graph, cluster, ["head/cpu", "edge/npu", "edge/cpu"], cache_dir)
    report = verify(graph, stages, x)
    assert report.ok and report.divergence is None
    assert len(report.stages) == 3
    assert "end to end" in report.table()


def test_miscompiled_op_is_bisected(mlp, cluster, tmp_path):
    _, x, graph = mlp
    registry = default_registry(EXTRA_BACKENDS)
    gelu = next(n.name for n in graph if "gelu" in str(n.target))
    owner = thirds(graph)[gelu]
    parts = split(graph, thirds(graph))
    stages = compile_partitions(
        graph,
        parts,
        [(cluster.device("head/cpu"), "faulty")] * 3,
        tmp_path,
        registry=registry,
        options=CompileOptions(extra=(("miscompile", "gelu"),)),
    )
    report = verify(graph, stages, x, registry=registry, work_dir=tmp_path / "bisect")
    assert not report.ok
    d = report.divergence
    assert d is not None and d.partition == stages[owner].index
    assert d.op == gelu and "gelu" in d.target
    assert [s.ok for s in report.stages].count(False) >= 1
    assert f"at op {gelu}" in report.table()
