"""What TVM takes and what it leaves to others: per-op `supports`, the NPU's op set and dtypes,
and a plan that puts an op TVM cannot convert on another device instead of failing."""

from __future__ import annotations

import pytest
import torch

from hetero.backends.base import CompileOptions
from hetero.backends.units import units_for
from hetero.cluster.spec import ClusterSpec, DeviceSpec, LinkSpec
from hetero.partitioner.graph import capture

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


class Odd(torch.nn.Module):
    """Linear -> lgamma (no Relax converter in TVM 0.27) -> Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)

    def forward(self, x):
        return self.b(torch.lgamma(self.a(x).abs() + 1))


@pytest.fixture(scope="module")
def tvm_backend():
    from hetero.backends.registry import default_registry

    return default_registry().get("tvm")


def _node(graph, base: str):
    return next(n for n in graph if n.target.split(".")[1:2] == [base])


def test_unconvertible_op_is_unsupported_with_a_reason(tvm_backend, cpu_device):
    graph = capture(Odd().eval(), (torch.randn(4, 16),))
    ok = tvm_backend.supports(_node(graph, "lgamma"), cpu_device)
    assert not ok and "lgamma" in ok.reason
    assert tvm_backend.supports(_node(graph, "addmm"), cpu_device)


def test_sdpa_is_supported(tvm_backend, cpu_device):
    from hetero.interfaces.models import tiny_gpt

    m, args = tiny_gpt(batch=1, seq=8)
    graph = capture(m, args)
    assert tvm_backend.supports(_node(graph, "scaled_dot_product_attention"), cpu_device)


def test_npu_op_set_and_dtypes(tvm_backend, npu_device):
    from hetero.interfaces.models import tiny_gpt

    m, args = tiny_gpt(batch=1, seq=8)
    half = capture(m.half(), args)
    assert tvm_backend.supports(_node(half, "addmm"), npu_device)
    emb = tvm_backend.supports(_node(half, "embedding"), npu_device)
    assert not emb and "data" in emb.reason
    m32, args32 = tiny_gpt(batch=1, seq=8)
    full = capture(m32, args32)
    f32 = tvm_backend.supports(_node(full, "addmm"), npu_device)
    assert not f32 and "float32" in f32.reason


def test_npu_artifact_is_emulated(tvm_backend, npu_device, artifact_cache, outputs_match):
    class Mlp(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(32, 64)
            self.norm = torch.nn.LayerNorm(64)

        def forward(self, x):
            return self.norm(torch.nn.functional.gelu(self.fc(x)))

    torch.manual_seed(0)
    m = Mlp().eval().half()
    x = torch.randn(4, 32).half()
    graph = capture(m, (x,))
    assert all(tvm_backend.supports(n, npu_device) for n in graph)
    _, units, env = units_for(graph, {n: 0 for n in graph.order}, x)
    art = artifact_cache.build(tvm_backend, units[0], npu_device, CompileOptions())
    assert art.manifest["emulated"] is True and art.manifest["device_kind"] == "npu"
    outputs_match(units[0], tvm_backend.load(art, npu_device)(x), env, 1e-2)


def test_plan_places_unconvertible_op_elsewhere(tvm_backend, cpu_device):
    """CPU runs eager, the NPU runs TVM: lgamma must land on the CPU, the rest may go anywhere."""
    from hetero import plan

    npu = DeviceSpec(
        name="local/npu", kind="npu", host="local", dtypes=("float32", "float16"),
        peak_flops=(("float32", 1e13),), mem_bandwidth=1e11, memory=1e9, emulated=True,
    )  # fmt: skip
    cpu = DeviceSpec(
        name="local/cpu", kind="cpu", host="local", cores=2, peak_flops=(("float32", 1e10),),
        mem_bandwidth=1e10, memory=1e9,
    )  # fmt: skip
    cluster = ClusterSpec("t", (cpu, npu), (LinkSpec("local/cpu", "local/npu", 1e10, 1e-6),))
    graph = capture(Odd().eval(), (torch.randn(4, 16),))
    p = plan(graph, cluster, backends={"cpu": "eager", "npu": "tvm"})
    lgamma = _node(graph, "lgamma").name
    where = {n: part.device for part in p.partitions for n in part.nodes}
    assert where[lgamma] == "local/cpu"


def test_cpu_artifact_loads_with_the_runtime_library_alone(
    tvm_backend, cpu_device, artifact_cache, tmp_path
):
    """TVM_USE_RUNTIME_LIB=1: the worker maps libtvm_runtime.so only, never the compiler."""
    import json
    import subprocess
    import sys

    from hetero.interfaces.models import mlp_block

    m, args = mlp_block(batch=1, seq=4)
    graph = capture(m, args)
    _, units, env = units_for(graph, {n: 0 for n in graph.order}, *args)
    art = artifact_cache.build(tvm_backend, units[0], cpu_device, CompileOptions())
    torch.save({"x": args[0], "want": env[units[0].outputs[0]]}, tmp_path / "io.pt")
    script = f"""
import json, torch
from hetero.backends.cache import ArtifactCache
from hetero.backends.registry import default_registry
from hetero.cluster.spec import DeviceSpec
io = torch.load({str(tmp_path / "io.pt")!r})
art = ArtifactCache({str(artifact_cache.root)!r}).get({art.key!r})
dev = DeviceSpec(name="w/cpu", kind="cpu", host="w", cores=1)
out = default_registry().get("tvm").load(art, dev)(io["x"])[0]
maps = open("/proc/self/maps").read()
print(json.dumps({{"compiler": "libtvm_compiler" in maps, "runtime": "libtvm_runtime" in maps,
                  "close": bool(torch.allclose(out, io["want"], atol=1e-5))}}))
"""
    env_vars = {**__import__("os").environ, "TVM_USE_RUNTIME_LIB": "1"}
    res = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env_vars, timeout=300
    )
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got == {"compiler": False, "runtime": True, "close": True}
