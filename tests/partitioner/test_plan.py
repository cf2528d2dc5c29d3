"""Plan: JSON round trip, explain table, picture, and the `hetero plan` command."""

from __future__ import annotations

import json

import pytest
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
