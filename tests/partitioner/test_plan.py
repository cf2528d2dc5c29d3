"""Plan: JSON round trip, explain table, picture, and the `hetero plan` command."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

import hetero
from hetero.errors import ConfigError
from hetero.partitioner.plan import Plan


@pytest.fixture(scope="module")
def npu_plan(tiny_gpt):
    model, inputs = tiny_gpt
    graph = hetero.capture(model, inputs)
    cluster = hetero.Cluster.from_yaml("configs/clusters/edge-cpu-npu.yaml")
    cluster = cluster.with_device("edge/npu", dtypes=("float16", "float32"))
    return hetero.plan(graph, cluster, "throughput", microbatches=4)


def test_json_round_trip(npu_plan, tmp_path):
    plan = npu_plan.with_measured({0: 1.25})
    path = tmp_path / "plan.json"
    plan.to_json(path)
    back = Plan.from_json(path)
    assert back == plan
    data = json.loads(path.read_text())
    data["schema_version"] = 0
    with pytest.raises(ConfigError, match="schema version"):
        Plan.from_dict(data)


def test_explain_names_devices_backends_and_reasons(npu_plan):
    text = npu_plan.with_measured({0: 1.25}).explain()
    for p in npu_plan.partitions:
        assert p.device in text and p.backend in text
    assert "1.250" in text  # measured ms
    assert "kept off a device" in text
    assert "emulated" in text
    assert "per microbatch" in text


def test_draw_png_and_svg(npu_plan, tmp_path):
    png = npu_plan.draw(tmp_path / "plan.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    svg = npu_plan.draw(tmp_path / "plan.svg")
    assert "<svg" in svg.read_text()
    with pytest.raises(ConfigError, match=r"\.png or \.svg"):
        npu_plan.draw(tmp_path / "plan.pdf")


def test_cli_plan_writes_json_and_picture(tmp_path):
    from hetero.interfaces.cli import app

    out, pic = tmp_path / "plan.json", tmp_path / "plan.png"
    result = CliRunner().invoke(
        app,
        [
            "plan",
            "hetero.interfaces.models:mlp_block",
            "--cluster",
            "configs/clusters/h100-sxm-node.yaml",
            "--out",
            str(out),
            "--draw",
            str(pic),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "node0/" in result.output
    assert Plan.from_json(out).cluster == "h100-sxm-node"
    assert pic.exists()


def test_cli_plan_reads_a_deploy_config(tmp_path):
    from hetero.interfaces.cli import app

    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", "configs/demo.yaml", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert Plan.from_json(out).cluster == "dev-box-npu"


class _TwoOut(torch.nn.Module):
    """A block handing the next one two values: its output and a residual."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, x):
        return self.lin(x), torch.tanh(x)


class _TwoIn(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)

    def forward(self, h, r):
        return self.lin(h) + r


class _Split(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = _TwoOut(), _TwoIn()

    def forward(self, x):
        return self.b(*self.a(x))


def test_a_cut_carrying_two_values_over_ray_is_one_hop_more_than_in_process():
    """The runtime sends one packet from a partition to each that reads from it: the two
    values crossing the cut are one hop over Ray, as are the caller's inputs and outputs;
    the planner's price and the plan's transfers say so alike."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.decisions import BackendAssignment, Objective
    from hetero.partitioner.reprice import assignment_of, pricing

    spec = hetero.Cluster.from_yaml("configs/clusters/dev-box-npu.yaml")
    graph = hetero.capture(_Split(), (torch.randn(4, 64),))
    backends = BackendAssignment.everywhere("eager")
    pins = {"a": "local/cpu", "b": "local/npu"}
    hop_s = 5e-3
    priced = {}
    for executor, hop in (("local", 0.0), ("ray", hop_s)):
        runtime = (RuntimeProfile(executor, stage_overhead=0.0, hop_overhead=hop),)
        cm = CostModel(CalibrationProfile(spec.name, runtime=runtime), executor=executor)
        kw = dict(backends=backends, cost_model=cm, pins=pins)
        plan = hetero.plan(graph, spec, "latency", **kw)
        at = pricing(graph, spec, Objective.LATENCY, registry=default_registry(), **kw)
        seconds = at.problem.latency(assignment_of(plan, at))
        assert plan.predicted_ms == pytest.approx(1e3 * seconds, rel=1e-9)
        priced[executor] = plan
    local, ray = priced["local"], priced["ray"]
    (cut,) = [t for t in ray.transfers if t.src >= 0 and t.dst >= 0]
    assert len(cut.values) == 2
    (before,) = [t for t in local.transfers if (t.src, t.dst) == (cut.src, cut.dst)]
    assert cut.predicted_ms == pytest.approx(before.predicted_ms + 1e3 * hop_s)
    # in, across the cut, out: three hops
    assert ray.predicted_ms == pytest.approx(local.predicted_ms + 3e3 * hop_s)
    assert f"{cut.predicted_ms:.3f}" in ray.explain()
