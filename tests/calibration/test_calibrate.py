"""Calibration per (device, backend): eager and TVM microbenchmarks, profile JSON, lookup."""

from __future__ import annotations

import json

import pytest
import torch

import hetero
import hetero.calibration as cal
from hetero.calibration import run as cal_run
from hetero.calibration import units as cal_units
from hetero.cluster.profile import (
    PROFILE_SCHEMA_VERSION,
    CalibrationProfile,
    DeviceProfile,
    Efficiency,
)
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment

CPU = DeviceSpec(
    name="local/cpu",
    kind="cpu",
    host="local",
    model="x",
    cores=1,
    peak_flops=(("float32", 100e9),),
    mem_bandwidth=10e9,
    memory=1e9,
    launch_overhead=5e-6,
)


_ALL_UNITS = cal_units.unit_modules  # before any test monkeypatches it


def _few_units(quick, dtype):
    """Two microbenchmarks of different classes: enough to exercise compile, load, fit."""
    units = _ALL_UNITS(True, dtype)
    first = {}
    for u in units:
        first.setdefault(u.op_class, u)
    return [first["matmul"], first["transcendental"]]


DEMO = hetero.Cluster.from_yaml("configs/clusters/dev-box-npu.yaml")


@pytest.fixture(scope="module")
def tvm_cache(tmp_path_factory):
    """One artifact cache for this file's TVM tests: the CLI test then finds the units the
    first test compiled (same device, same fixed weights) instead of compiling them again."""
    pytest.importorskip("tvm")
    from hetero.backends.cache import ArtifactCache

    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def eager_calibration():
    """A quick eager calibration of float32 and bfloat16, measured once: its float32 half is
    the whole default run (dtypes=("float32",); the plain class keys are its factors), and
    measuring that again on its own cost 7 s of the foreground share on the 2-core box."""
    return cal.calibrate_device(CPU, backend="eager", quick=True, dtypes=("float32", "bfloat16"))


def test_quick_eager_calibration_fits_every_class(eager_calibration):
    prof, samples = eager_calibration
    assert prof.backend == "eager" and prof.threads == 1
    assert prof.launch_overhead > 0 and prof.call_overhead >= 0
    keys = {e.key for e in prof.efficiency}
    assert {"matmul", "elementwise", "transcendental", "norm", "attention", "data"} <= keys
    assert all(s.seconds > 0 for s in samples)


def test_eager_calibration_measures_each_dtype_and_the_runner(eager_calibration):
    prof, samples = eager_calibration
    keys = {e.key for e in prof.efficiency}
    assert {"matmul/float32", "matmul/bfloat16", "norm/bfloat16", "matmul"} <= keys
    assert {s.dtype for s in samples} == {"float32", "bfloat16"}
    # a partition's op goes through the exported program's Python code: never cheaper
    assert prof.runner_overhead >= 0 and prof.view_overhead >= 0
    for s in samples:
        assert cal.sample_prediction(prof, s) > 0


def test_runner_dispatch_counts_per_op_and_per_call():
    import torch

    per_op, per_view, call = cal.runner_dispatch(torch.device("cpu"), torch.float32, lambda: None)
    assert 0 < per_op < 1e-3 and 0 <= per_view < 1e-3 and 0 <= call < 1e-2


def test_tvm_calibration_compiles_through_the_backend(tvm_cache, monkeypatch):
    monkeypatch.setattr(cal_units, "unit_modules", _few_units)
    cache = tvm_cache
    cpu = DEMO.device("local/cpu")
    prof, samples = cal.calibrate_device(cpu, backend="tvm", cache=cache, workers=1)
    assert prof.backend == "tvm" and prof.device == "local/cpu"
    assert prof.call_overhead > 0  # calling a compiled partition is measured, not assumed
    assert prof.view_overhead == 0.0
    assert "apache-tvm=" in prof.backend_versions  # what the factors describe
    assert {s.op_class for s in samples} == {"matmul", "transcendental"}
    assert {e.key for e in prof.efficiency} >= {"matmul", "matmul/float32", "transcendental"}
    # the call unit plus two microbenchmarks went through the artifact cache
    keys = cache.keys()
    assert len(keys) == 3
    # and a second calibration finds them there instead of compiling again
    before = {k: (cache.root / k).stat().st_mtime_ns for k in keys}
    cal.calibrate_device(cpu, backend="tvm", cache=cache, workers=1)
    assert cache.keys() == keys
    assert {k: (cache.root / k).stat().st_mtime_ns for k in keys} == before


def test_tvm_units_skip_what_the_npu_cannot_run(tvm_cache, monkeypatch):
    """The emulated NPU runs no data ops: its embedding microbenchmark is skipped."""

    def units(quick, dtype):
        return [u for u in _ALL_UNITS(True, dtype) if u.op_class in ("data", "norm")][:3]

    monkeypatch.setattr(cal_units, "unit_modules", units)
    npu = DEMO.device("local/npu")
    logs: list[str] = []
    prof, samples = cal.calibrate_device(
        npu, backend="tvm", cache=tvm_cache, workers=1, log=logs.append
    )
    assert {s.op_class for s in samples} == {"norm"}
    assert any("skipped" in line and "embedding" in line for line in logs)
    assert prof.kind == "npu" and prof.backend == "tvm"


def test_calibrate_maps_backends_per_device_kind(monkeypatch):
    seen = []

    def fake(device, *, backend, **kw):
        seen.append((device.name, backend))
        return DeviceProfile(device.name, device.kind, backend=backend), []

    monkeypatch.setattr(cal_run, "calibrate_device", fake)
    monkeypatch.setattr(cal_run, "prepare_units", lambda **kw: [])
    both = [
        BackendAssignment.parse({"cpu": "eager", "npu": "tvm"}),
        BackendAssignment.parse({"cpu": "tvm", "npu": "tvm"}),
    ]
    prof, skipped, samples = cal.calibrate(DEMO, backends=both, emulated=True)
    assert seen == [("local/cpu", "eager"), ("local/cpu", "tvm"), ("local/npu", "tvm")]
    assert not skipped and set(samples) == set(seen)
    assert [(d.device, d.backend) for d in prof.devices] == seen
    seen.clear()
    cal.calibrate(DEMO)  # no backends: eager, emulated devices skipped
    assert seen == [("local/cpu", "eager")]


def _two_backend_profile() -> CalibrationProfile:
    return CalibrationProfile(
        cluster="c",
        devices=(
            DeviceProfile(
                "local/cpu",
                "cpu",
                launch_overhead=4e-6,
                call_overhead=10e-6,
                efficiency=(Efficiency("matmul", 0.5, 0.5, overhead=4e-6),),
                backend="eager",
            ),
            DeviceProfile(
                "local/cpu",
                "cpu",
                launch_overhead=1e-6,
                call_overhead=50e-6,
                view_overhead=0.0,
                efficiency=(Efficiency("matmul", 0.1, 0.2, overhead=80e-6),),
                backend="tvm",
                threads=2,
            ),
        ),
    )


def test_profile_round_trip_keeps_the_backend(tmp_path):
    prof = _two_backend_profile()
    path = tmp_path / "p.json"
    prof.to_json(path)
    data = json.loads(path.read_text())
    assert data["schema_version"] == PROFILE_SCHEMA_VERSION
    assert [d["backend"] for d in data["devices"]] == ["eager", "tvm"]
    assert CalibrationProfile.load(path) == prof


def test_model_picks_the_backend_specific_entry():
    cm = CostModel(_two_backend_profile(), fusing_backends=frozenset({"tvm"}))
    assert cm.efficiency(CPU, "matmul", "float32", "tvm") == (0.1, 0.2)
    assert cm.efficiency(CPU, "matmul", "float32", "eager") == (0.5, 0.5)
    assert cm.call_overhead(CPU, "tvm") == 50e-6
    assert cm.call_overhead(CPU, "eager") == 10e-6
    assert cm.op_overhead(CPU, "matmul", backend="tvm") == 80e-6
    # a backend never measured: the device's other entry beats datasheet defaults
    assert cm.efficiency(CPU, "matmul", "float32", "triton") == (0.5, 0.5)
    assert cm.profile.backends_of(CPU) == ("eager", "tvm")

    graph = hetero.capture(torch.nn.Linear(64, 64), (torch.randn(8, 64),))
    (g,) = graph.coarsen(depth=0).groups
    ops = [graph[n] for n in g.nodes]
    tvm = cm.group_time(g, ops, CPU, backend="tvm")
    eager = cm.group_time(g, ops, CPU, backend="eager")
    # one matmul kernel at the TVM entry's overhead; eager pays the eager entry's per op
    assert tvm == pytest.approx(80e-6 + max(2 * 8 * 64 * 64 / (100e9 * 0.1), 0), rel=0.2)
    assert eager < tvm


def test_schema_1_profile_loads_as_eager(tmp_path):
    old = {
        "schema_version": 1,
        "cluster": "c",
        "devices": [
            {
                "device": "local/cpu",
                "kind": "cpu",
                "model": "x",
                "launch_overhead": 3e-6,
                "efficiency": [{"key": "matmul", "compute": 0.3, "memory": 0.4}],
            }
        ],
        "links": [],
    }
    path = tmp_path / "old.json"
    path.write_text(json.dumps(old))
    prof = CalibrationProfile.load(path)
    (dp,) = prof.devices
    assert dp.backend == "eager" and prof.schema_version == PROFILE_SCHEMA_VERSION
    cm = CostModel(prof)
    assert cm.efficiency(CPU, "matmul", "float32", "tvm") == (0.3, 0.4)  # the only entry
    assert cm.launch_overhead(CPU, "eager") == 3e-6
    path.write_text(json.dumps({**old, "schema_version": 99}))
    with pytest.raises(ConfigError, match="re-run `hetero calibrate`"):
        CalibrationProfile.load(path)


def test_calibrate_command_through_tvm(tvm_cache, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from hetero.interfaces.cli import app

    monkeypatch.setattr(cal_units, "unit_modules", _few_units)
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tvm_cache.root))  # compiled by the test above
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(
        app,
        ["calibrate", "--config", "configs/demo.yaml", "--out", str(out), "--quick"],
    )
    assert result.exit_code == 0, result.output
    assert "skipped local/npu" in result.output and "tvm" in result.output
    (dp,) = CalibrationProfile.load(out).devices
    assert (dp.device, dp.backend) == ("local/cpu", "tvm")


def test_sequence_factor_scales_fused_groups_only():
    from dataclasses import replace

    base = _two_backend_profile()
    tvm = replace(base.devices[1], sequence_factor=1.5)
    prof = replace(base, devices=(base.devices[0], tvm))
    graph = hetero.capture(torch.nn.Linear(64, 64), (torch.randn(8, 64),))
    (g,) = graph.coarsen(depth=0).groups
    ops = [graph[n] for n in g.nodes]
    fuses = frozenset({"tvm"})  # declared by the TVM backend; the planner passes it on
    plain, scaled = CostModel(base, fusing_backends=fuses), CostModel(prof, fusing_backends=fuses)
    assert scaled.group_time(g, ops, CPU, backend="tvm") == pytest.approx(
        1.5 * plain.group_time(g, ops, CPU, backend="tvm")
    )
    assert scaled.group_time(g, ops, CPU, backend="eager") == plain.group_time(
        g, ops, CPU, backend="eager"
    )
    assert CalibrationProfile.from_dict(json.loads(prof.to_json())) == prof
