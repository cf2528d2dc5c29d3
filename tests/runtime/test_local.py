"""The in-process executor: the same stages as the Ray deployment, no cluster."""

from __future__ import annotations

import pytest
import torch

from hetero.errors import ConfigError, WorkerError
from hetero.runtime.executor import LocalExecutor
from hetero.runtime.stage import Executor, StageSpec, check_stages


def test_local_matches_eager(staged):
    stages, needed, inputs, expected = staged
    ex = LocalExecutor(stages, needed)
    assert isinstance(ex, Executor)
    out = ex.run(inputs)
    assert list(out) == list(needed)
    torch.testing.assert_close(out[needed[0]], expected)
    assert set(ex.measured_ms()) == {s.index for s in stages}
    assert "p0" in ex.metrics.table()
    ex.shutdown()
    with pytest.raises(WorkerError, match="shut down"):
        ex.run(inputs)


def test_run_many_is_run_each(staged):
    stages, needed, inputs, expected = staged
    with LocalExecutor(stages, needed) as ex:
        outs = ex.run_many([inputs, inputs])
    assert len(outs) == 2
    torch.testing.assert_close(outs[1][needed[0]], expected)


def test_stage_order_is_checked(staged):
    stages, needed, inputs, _ = staged
    with pytest.raises(ConfigError, match="no earlier stage"):
        check_stages(list(reversed(stages)), list(inputs), needed)
    with pytest.raises(ConfigError, match="computed by no stage"):
        check_stages(stages, list(inputs), ["nope"])


def test_transfer_bytes_are_counted(staged):
    stages, needed, inputs, _ = staged
    with LocalExecutor(stages, needed) as ex:
        ex.run(inputs)
        d = ex.metrics.as_dict()
    x = next(iter(inputs.values()))
    assert d["transfers"]["in->p0"]["bytes"] == x.numel() * x.element_size()
    assert all(isinstance(s, StageSpec) for s in stages)


def _plan(graph, devices, objective="latency"):
    from rt_helpers import thirds

    from hetero.partitioner.plan import Plan, PlannedPartition

    groups: dict[int, list[str]] = {}
    for name, p in thirds(graph).items():
        groups.setdefault(p, []).append(name)
    parts = tuple(
        PlannedPartition(
            index=10 + p,  # plan indices need not start at 0
            nodes=tuple(nodes),
            groups=(),
            device=devices[p],
            backend="eager",
            predicted_ms=0.5 * (p + 1),
        )
        for p, nodes in sorted(groups.items())
    )
    return Plan("MLPBlock", "two-hosts", objective, "test", parts, predicted_ms=3.0)


def test_compile_plan_names_stages_by_plan_index(mlp, cluster, cache_dir):
    from hetero.backends.registry import default_registry
    from hetero.runtime.build import compile_plan, needed_outputs

    model, x, graph = mlp
    plan = _plan(graph, ["head/cpu", "edge/npu", "edge/cpu"])
    stages = compile_plan(graph, plan, cluster, cache_dir, registry=default_registry())
    assert [s.index for s in stages] == [10, 11, 12]
    assert [s.predicted_ms for s in stages] == [0.5, 1.0, 1.5]
    assert stages[1].device.name == "edge/npu"
    with LocalExecutor(stages, needed_outputs(graph), plan=plan) as ex:
        out = ex.run(dict(zip(graph.inputs, x, strict=True)))
        torch.testing.assert_close(out[needed_outputs(graph)[0]], model(*x))
        measured = plan.with_measured(ex.measured_ms())
        assert [i for i, _ in measured.measured_ms] == [10, 11, 12]
        assert "plan predicts 3.000 ms" in ex.metrics.table()


def test_throughput_is_printed_next_to_the_prediction(mlp, cluster, cache_dir, staged):
    from hetero.runtime.pipeline import measure_throughput, predicted_rate

    _, _, graph = mlp
    stages, needed, inputs, _ = staged
    plan = _plan(graph, ["head/cpu", "edge/npu", "edge/cpu"])
    assert predicted_rate(plan) == pytest.approx(1e3 / 1.5)  # the slowest stage paces it
    tp_plan = _plan(graph, ["head/cpu"] * 3, objective="throughput")
    assert predicted_rate(tp_plan) == pytest.approx(1e3 / 3.0)
    with LocalExecutor(stages, needed) as ex:
        tp = measure_throughput(ex, [inputs] * 3, plan, compare_sequential=True)
    assert tp.items == 3 and tp.per_s > 0
    assert "predicted" in tp.line() and "one at a time" in tp.line()
