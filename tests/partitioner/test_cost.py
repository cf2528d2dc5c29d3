"""CostModel: roofline arithmetic, profiles (JSON, lookup), calibration's fit."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import hetero
from hetero.calibration import Sample, fit, present
from hetero.cluster.profile import (
    CalibrationProfile,
    DeviceProfile,
    Efficiency,
    LinkProfile,
    default_profile_path,
)
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.cost import DEFAULT_EFFICIENCY, CostModel

# the TVM backend declares that it fuses (Backend.fuses); the planner tells the cost model
TVM_FUSES = frozenset({"tvm"})

CPU = DeviceSpec(
    name="h/cpu",
    kind="cpu",
    host="h",
    model="x",
    peak_flops=(("float32", 100e9),),
    mem_bandwidth=10e9,
    memory=1e9,
    launch_overhead=5e-6,
)


def test_roofline_takes_the_slower_bound():
    cm = CostModel()
    ec, em = DEFAULT_EFFICIENCY["cpu"]["matmul"]
    assert cm.roofline(CPU, "matmul", "float32", 1e9, 0) == pytest.approx(1e9 / (100e9 * ec))
    assert cm.roofline(CPU, "matmul", "float32", 0, 1e8) == pytest.approx(1e8 / (10e9 * em))


def test_fused_group_counts_only_boundary_bytes(mlp):
    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    groups = graph.coarsen(depth=0)
    g = groups.groups[0]
    ops = [graph[n] for n in g.nodes]
    cm = CostModel(fusing_backends=TVM_FUSES)
    eager = cm.group_time(g, ops, CPU, backend="eager")
    fused = cm.group_time(g, ops, CPU, backend="tvm")
    assert eager == pytest.approx(sum(cm.op_time(op, CPU) for op in ops))
    assert fused < eager  # fewer launches, no intermediate round trips


GPU = DeviceSpec(
    name="h/gpu",
    kind="gpu",
    host="h",
    model="g",
    peak_flops=(("float32", 50e12), ("float16", 800e12)),
    mem_bandwidth=3e12,
    memory=80e9,
    launch_overhead=4e-6,
)


def _gpu_profile(dispatch: float) -> CostModel:
    return CostModel(
        CalibrationProfile(
            "c",
            devices=(
                DeviceProfile("h/gpu", "gpu", launch_overhead=dispatch, view_overhead=dispatch / 4),
            ),
        )
    )


@pytest.mark.parametrize("scale", [1.0, 4096.0])
def test_eager_on_a_gpu_takes_the_slower_of_dispatch_and_kernels(mlp, scale):
    """The host queues kernels while the GPU runs earlier ones: a group's time is the
    larger of the two sides, never their sum (a CPU still pays both, one after the other)."""
    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    g = graph.coarsen(depth=0).groups[0]
    ops = [graph[n] for n in g.nodes]
    real = [op for op in ops if op.op_class != "view"]
    views = len(ops) - len(real)
    for dispatch in (1e-6, 30e-6):
        cm = _gpu_profile(dispatch)
        t = cm.group_time(g, ops, GPU, backend="eager", scale=scale)
        host = sum(max(1, op.launches) for op in real) * dispatch + views * dispatch / 4
        kernels = sum(
            cm.op_time(op, GPU, scale) - op.launches * dispatch + op.launches * 4e-6 for op in real
        )
        assert t == pytest.approx(max(host, kernels))
    small, large = _gpu_profile(30e-6), _gpu_profile(1e-6)
    # many tiny ops: dispatch-bound, so a faster host makes the group faster
    if scale == 1.0:
        assert small.group_time(g, ops, GPU) > large.group_time(g, ops, GPU)
    cpu = CostModel().group_time(g, ops, CPU, backend="eager", scale=scale)
    assert cpu == pytest.approx(sum(CostModel().op_time(op, CPU, scale) for op in ops))


def test_runner_overhead_applies_to_its_own_backend_only():
    prof = CalibrationProfile(
        "c",
        devices=(
            DeviceProfile(
                "h/gpu",
                "gpu",
                launch_overhead=5e-6,
                runner_overhead=10e-6,
                efficiency=(Efficiency("matmul", 0.5, 0.5, overhead=6e-6),),
            ),
        ),
    )
    cm = CostModel(prof)
    assert cm.op_overhead(GPU, "matmul", backend="eager") == pytest.approx(16e-6)
    assert cm.op_overhead(GPU, "norm", backend="eager") == pytest.approx(15e-6)
    # Inductor priced through eager's entry (no entry of its own): not eager's runner
    assert cm.op_overhead(GPU, "matmul", backend="inductor") == pytest.approx(6e-6)
    again = CalibrationProfile.from_dict(json.loads(prof.to_json()))
    assert again.devices[0].runner_overhead == 10e-6


def test_profile_round_trip_and_lookup(tmp_path):
    prof = CalibrationProfile(
        cluster="c",
        devices=(
            DeviceProfile(
                device="other/cpu",
                kind="cpu",
                model="x",
                launch_overhead=1e-6,
                view_overhead=2e-7,
                efficiency=(Efficiency("matmul", 0.1, 0.2, overhead=3e-6),),
            ),
        ),
        links=(LinkProfile("a", "b", 1e9, 1e-5),),
    )
    path = tmp_path / "p.json"
    prof.to_json(path)
    back = CalibrationProfile.load(path)
    assert back == prof
    cm = CostModel.load(path)
    assert cm.efficiency(CPU, "matmul", "float32") == (0.1, 0.2)  # matched by model string
    assert cm.efficiency(CPU, "norm", "float32") == DEFAULT_EFFICIENCY["cpu"]["norm"]
    assert cm.launch_overhead(CPU) == 1e-6
    assert cm.op_overhead(CPU, "matmul") == 3e-6  # fitted per class
    assert cm.op_overhead(CPU, "norm") == 1e-6
    path.write_text('{"schema_version": 99}')
    with pytest.raises(ConfigError, match="re-run `hetero calibrate`"):
        CalibrationProfile.load(path)


def test_cached_profile_is_found(tmp_path, monkeypatch):
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path))
    cluster = hetero.Cluster.from_yaml("configs/clusters/cpu-2core.yaml")
    CalibrationProfile(
        cluster.name, (DeviceProfile("box/cpu", "cpu", launch_overhead=3e-6),)
    ).to_json(default_profile_path(cluster.name))
    cm = CostModel.load(cluster=cluster)
    assert cm.launch_overhead(cluster.device("box/cpu")) == 3e-6


def test_transfer_uses_measured_link_else_the_route():
    cluster = hetero.Cluster.from_yaml("configs/clusters/h100-sxm-node.yaml")
    cm = CostModel()
    t = cm.transfer_time(cluster, "node0/cpu", "node0/gpu", 54.6e9)
    assert t == pytest.approx(1.0 + 10e-6)
    link = (LinkProfile("node0/gpu", "node0/cpu", 20e9, 0.0),)
    measured = CostModel(CalibrationProfile(cluster.name, links=link))
    assert measured.transfer_time(cluster, "node0/cpu", "node0/gpu", 20e9) == pytest.approx(1.0)
    # the same box described with another link (PCIe Gen3): the file's link, not the one
    # measured on the cluster the profile was taken for
    other = CostModel(CalibrationProfile("another-cluster", links=link))
    assert other.transfer_time(cluster, "node0/cpu", "node0/gpu", 54.6e9) == pytest.approx(
        1.0 + 10e-6
    )


def test_streamed_weights_take_the_shared_rate_only_beside_the_cpu():
    cluster = hetero.Cluster.from_yaml("configs/clusters/h100-sxm-node.yaml")
    gpu = cluster.device("node0/gpu")
    both = (LinkProfile("node0/cpu", "node0/gpu", 50e9, 0.0, shared_by_dtype=(("float16", 40e9),)),)
    cm = CostModel(CalibrationProfile(cluster.name, links=both))
    assert cm.stream_time(cluster, gpu, 1e9) == pytest.approx(1 / 50)
    assert cm.stream_time(cluster, gpu, 1e9, beside="") == pytest.approx(1 / 40)
    # a link measured alone only: its one rate either way
    alone = (LinkProfile("node0/cpu", "node0/gpu", 50e9, 0.0),)
    cm = CostModel(CalibrationProfile(cluster.name, links=alone))
    assert cm.stream_time(cluster, gpu, 1e9, beside="") == pytest.approx(1 / 50)


def test_fit_recovers_known_efficiencies():
    peak, bw, ov = 100e9, 10e9, 5e-6
    ec, em = 0.4, 0.6
    samples = []
    for f, b in [(1e6, 1e3), (1e8, 1e5), (1e9, 1e6), (1e3, 1e6), (1e3, 1e8), (1e7, 1e7)]:
        t = max(f / (peak * ec), b / (bw * em)) + ov
        samples.append(Sample("matmul", "x", f, b, t))
    got_c, got_m, got_ov, err = fit(samples, peak, bw, ov)
    assert 0.5 * ov <= got_ov <= 1.5 * ov
    assert got_c == pytest.approx(ec, rel=0.1)
    assert got_m == pytest.approx(em, rel=0.1)
    assert err < 0.1


def test_present_skips_emulated_devices():
    cluster = hetero.Cluster.from_yaml("configs/clusters/dev-box-npu.yaml")
    ok, skipped = present(cluster)
    assert [d.name for d in ok] == ["local/cpu"]
    assert skipped[0].device == "local/npu" and "emulated" in skipped[0].reason
    assert np.isfinite(1.0)


def test_transcendental_ops_are_priced_apart():
    from hetero.partitioner.cost import cost_class

    graph = hetero.capture(_Gelu(), (torch.randn(4, 8),))
    classes = {graph[n].target: cost_class(graph[n]) for n in graph.nodes}
    assert classes["aten.gelu.default"] == "transcendental"
    assert classes["aten.add.Tensor"] == "elementwise"


class _Gelu(torch.nn.Module):
    def forward(self, x):
        return torch.nn.functional.gelu(x, approximate="tanh") + x


def test_calibrate_command_writes_a_profile(tmp_path, monkeypatch):
    """The CLI end to end, with two tiny microbenchmarks so that it runs in a second."""
    from typer.testing import CliRunner

    from hetero.calibration import eager as cal_eager
    from hetero.interfaces.cli import app

    def tiny(dev, dtype, quick):
        a = torch.randn(32, 32)
        yield "matmul", "mm", lambda: a @ a, 2 * 32**3, 3 * 32 * 32 * 4
        yield "elementwise", "add", lambda: a + a, 32 * 32, 3 * 32 * 32 * 4

    monkeypatch.setattr(cal_eager, "cases", tiny)
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(
        app, ["calibrate", "--cluster", "configs/clusters/dev-box-npu.yaml", "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert "skipped local/npu" in result.output and "matmul" in result.output
    prof = CalibrationProfile.load(out)
    (dev,) = prof.devices
    assert dev.device == "local/cpu" and dev.launch_overhead > 0 and dev.call_overhead >= 0
    assert {e.key for e in dev.efficiency} >= {"matmul", "elementwise", "matmul/float32"}


class _LinearGelu(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(16, 32)

    def forward(self, x):
        return torch.nn.functional.gelu(self.fc(x), approximate="tanh")


def test_fused_terms_count_one_kernel_per_anchor():
    from hetero.partitioner.cost import fused_terms

    graph = hetero.capture(_LinearGelu(), (torch.randn(4, 16),))
    (g,) = graph.coarsen(depth=0).groups
    ops = [graph[n] for n in g.nodes]
    terms = fused_terms(g, ops)
    assert dict(terms.kernels) == {"matmul": 1}  # the GELU fuses into the matmul's kernel
    assert terms.act_bytes + terms.param_bytes == g.fused_bytes
    assert {c for c, _, _ in terms.flops} == {"matmul", "transcendental"}

    graph = hetero.capture(_Gelu(), (torch.randn(4, 8),))
    (g,) = graph.coarsen(depth=0).groups
    terms = fused_terms(g, [graph[n] for n in g.nodes])
    assert dict(terms.kernels) == {"transcendental": 1}  # elementwise only: one kernel


def test_fused_group_pays_its_classes_kernel_overhead():
    graph = hetero.capture(_LinearGelu(), (torch.randn(4, 16),))
    (g,) = graph.coarsen(depth=0).groups
    ops = [graph[n] for n in g.nodes]
    prof = CalibrationProfile(
        "c",
        (
            DeviceProfile(
                "h/cpu",
                "cpu",
                launch_overhead=1e-6,
                efficiency=(Efficiency("matmul", 0.5, 0.5, overhead=40e-6),),
                backend="tvm",
            ),
        ),
    )
    t = CostModel(prof, fusing_backends=TVM_FUSES).group_time(g, ops, CPU, backend="tvm")
    assert 40e-6 < t < 45e-6  # one matmul kernel's overhead + a tiny roofline


# ---- feedback: corrections and the executor's terms ----------------------------------------


def _feedback_profile(**runtime):
    from hetero.cluster.profile import Correction, RuntimeProfile

    return CalibrationProfile(
        cluster="c",
        corrections=(
            Correction("h/cpu", "eager", "matmul@9", 3.0),
            Correction("h/cpu", "eager", "matmul", 2.0),
            Correction("h/cpu", "eager", "*", 1.5),
            Correction("h/cpu", "eager", "call", 4.0),
            Correction("other", "eager", "*", 9.0, model="x"),
        ),
        runtime=(RuntimeProfile("ray", **runtime),) if runtime else (),
    )


def test_a_correction_is_looked_up_by_class_and_bucket_then_class_then_all(mlp):
    from hetero.partitioner.cost import group_key

    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    g = graph.coarsen(depth=0).groups[0]
    ops = [graph[n] for n in g.nodes]
    plain = CostModel().group_time(g, ops, CPU, backend="eager")
    cls, bucket = group_key(g, CPU)
    cm = CostModel(_feedback_profile())
    expected = {("matmul", 9): 3.0, ("matmul", 0): 2.0, ("norm", 9): 1.5}
    for key, factor in expected.items():
        assert cm.correction(CPU, "eager", key) == factor
    assert cm.correction(CPU, "tvm", ("matmul", 9)) == 1.0  # another backend: none
    want = {"matmul": 3.0 if bucket == 9 else 2.0}.get(cls, 1.5)
    assert cm.group_time(g, ops, CPU, backend="eager") == pytest.approx(want * plain)
    assert cm.base().group_time(g, ops, CPU, backend="eager") == pytest.approx(plain)
    # a device of the same model in another cluster finds the corrections by model
    twin = DeviceSpec(**{**CPU.__dict__, "name": "elsewhere/cpu"})
    assert cm.correction(twin, "eager", ("norm", 1)) == 9.0


def test_the_executor_adds_its_stage_and_hop_costs():
    cluster = hetero.Cluster.from_yaml("configs/clusters/dev-box-npu.yaml")
    prof = _feedback_profile(stage_overhead=30e-6, hop_overhead=800e-6, samples=5)
    local = CostModel(prof)  # "local": no runtime entry measured for it
    ray = CostModel(prof, executor="ray")
    runner = CostModel().call_overhead(CPU, "eager")
    assert local.call_overhead(CPU, "eager") == pytest.approx(4.0 * runner)
    assert ray.call_overhead(CPU, "eager") == pytest.approx(4.0 * runner + 30e-6)
    a, b = cluster.devices[0].name, cluster.devices[1].name
    link = CostModel().transfer_time(cluster, a, b, 1e6)
    assert ray.transfer_time(cluster, a, b, 1e6) == pytest.approx(link + 800e-6)
    assert ray.transfer_time(cluster, a, a, 1e6) == 0.0
    assert ray.link_time(cluster, a, b, 1e6) == pytest.approx(link)


def test_a_profile_with_feedback_round_trips_and_an_older_one_reads(tmp_path):
    prof = _feedback_profile(stage_overhead=3e-5, hop_overhead=1e-3, samples=2)
    path = tmp_path / "p.json"
    prof.to_json(path)
    again = CalibrationProfile.load(path)
    assert again.corrections == prof.corrections and again.runtime == prof.runtime
    older = json.loads(path.read_text())
    for key in ("corrections", "runtime"):
        older.pop(key)
    older["schema_version"] = 2
    read = CalibrationProfile.from_dict(older)
    assert read.corrections == () and read.runtime == ()
    assert prof.without_feedback().corrections == ()
