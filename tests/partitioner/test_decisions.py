"""The typed decisions: parsed once at the edge, unknown names answered with the known ones,
and one backend registry honoured from planning through the runtime."""

from __future__ import annotations

import json

import pytest
import torch

import hetero
from hetero.backends.base import CompileOptions
from hetero.backends.eager import EagerBackend
from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
from hetero.partitioner.decisions import BackendAssignment, ExecutorKind, Objective
from hetero.partitioner.plan import Plan


def test_objective_parses_strings_and_names_the_known_ones():
    assert Objective.parse("throughput") is Objective.THROUGHPUT
    assert Objective.parse(Objective.LATENCY) is Objective.LATENCY
    assert f"{Objective.LATENCY}" == "latency" and Objective.THROUGHPUT.pipelined
    with pytest.raises(ConfigError, match="known: latency, throughput"):
        Objective.parse("fast")


def test_backend_assignment_has_one_shape():
    a = BackendAssignment.parse({"gpu": "eager"})
    assert a.to_dict() == {"cpu": "tvm", "gpu": "eager", "npu": "tvm"}
    assert BackendAssignment.parse(None) == BackendAssignment()
    assert BackendAssignment.parse(a) is a
    with pytest.raises(ConfigError, match="known: gpu, cpu, npu"):
        BackendAssignment.parse({"tpu": "tvm"})
    with pytest.raises(ConfigError, match=r"known: (cudagraphs, )?eager, inductor"):
        BackendAssignment.parse({"cpu": "tmv"}, known=default_registry().names())


def test_plan_json_keeps_the_objective_typed(mlp):
    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    cluster = hetero.Cluster.from_yaml("configs/clusters/cpu-2core.yaml")
    plan = hetero.plan(graph, cluster, "throughput", backends={"cpu": "eager"})
    assert plan.objective is Objective.THROUGHPUT
    again = Plan.from_json(plan.to_json())
    assert again.objective is Objective.THROUGHPUT and again == plan
    assert json.loads(plan.to_json())["objective"] == "throughput"


def test_backend_options_are_typed_and_unknown_ones_refused():
    reg = default_registry()
    tvm = reg.get("tvm")
    opts = CompileOptions(extra=(("onednn", False), ("weights", "streamed")))
    assert tvm.parse_options(opts).onednn is False  # the eager knob is not TVM's concern
    assert reg.get("eager").parse_options(opts).weights == "streamed"
    reg.check_options(opts)
    with pytest.raises(ConfigError, match=r"'onednnn'.*known: .*onednn"):
        reg.check_options(CompileOptions(extra=(("onednnn", False),)))
    with pytest.raises(ConfigError, match="expected bool"):
        tvm.parse_options(CompileOptions(extra=(("onednn", "no"),)))


def test_fusing_is_declared_by_the_backend():
    reg = default_registry()
    assert {n for n in ("eager", "tvm", "triton", "inductor") if reg.get(n).fuses} == {
        "tvm",
        "triton",
        "inductor",
    }


class _Mine(EagerBackend):
    """A plug-in known only to the registry handed to hetero.compile."""

    name = "mine"
    device_kinds = ("cpu",)


def test_a_custom_registry_is_honoured_through_the_runtime(mlp, tmp_path):
    model, inputs = mlp
    reg = default_registry(extra=[("mine", _Mine)])
    cm = hetero.compile(
        model,
        inputs,
        cluster="configs/clusters/cpu-2core.yaml",
        backends={"cpu": "mine"},
        cache_dir=tmp_path,
        executor="local",
        registry=reg,
    )
    try:
        assert {p.backend for p in cm.plan.partitions} == {"mine"}
        assert {s.backend for s in cm.stages} == {"mine"}
        with torch.no_grad():
            torch.testing.assert_close(cm(*inputs), model(*inputs))
    finally:
        cm.shutdown()


def test_executor_auto_is_local_on_one_host_and_a_name_is_typed_once():
    one = ClusterSpec.from_yaml("configs/clusters/dev-box-npu.yaml")
    assert ExecutorKind.parse("auto", one) is ExecutorKind.LOCAL
    assert ExecutorKind.parse("ray", one) is ExecutorKind.RAY
    assert ExecutorKind.parse(ExecutorKind.RAY, one) is ExecutorKind.RAY
    with pytest.raises(ConfigError, match=r"'rya' is not an executor \(did you mean 'ray'\?\)"):
        ExecutorKind.parse("rya", one)
