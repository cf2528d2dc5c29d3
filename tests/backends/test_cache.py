"""The artifact cache: hits, verification before load, rebuild of corrupt entries, atomicity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetero.backends.base import CompileOptions, Manifest
from hetero.backends.cache import ENV_VAR, MANIFEST, ArtifactCache
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.eager import EagerBackend
from hetero.backends.units import units_for
from hetero.errors import ArtifactCorrupt, CompileError
from hetero.interfaces.models import mlp_block
from hetero.partitioner.graph import capture


class CountingEager(EagerBackend):
    """The eager backend, counting compiles (to tell a hit from a rebuild)."""

    name = "eager"

    def __init__(self) -> None:
        self.compiles = 0

    def compile(self, unit, device, options, out_dir: Path) -> Manifest:
        self.compiles += 1
        return super().compile(unit, device, options, out_dir)


@pytest.fixture(scope="module")
def unit():
    m, args = mlp_block(batch=1, seq=8)
    graph = capture(m, args)
    _, units, env = units_for(graph, {n: 0 for n in graph.order}, *args)
    return units[0], env


def test_second_build_is_a_hit(tmp_path, unit, cpu_device):
    cache = ArtifactCache(tmp_path)
    backend = CountingEager()
    a = cache.build(backend, unit[0], cpu_device, CompileOptions())
    b = cache.build(backend, unit[0], cpu_device, CompileOptions())
    assert backend.compiles == 1
    assert a.key == b.key and a.path == b.path
    assert a.key in cache and cache.keys() == [a.key]
    manifest = json.loads((a.path / MANIFEST).read_text())
    assert manifest["key"] == a.key and set(manifest["files"]) == {"program.pt2"}
    # different options -> a different key
    c = cache.build(backend, unit[0], cpu_device, CompileOptions(dtype="float16"))
    assert c.key != a.key and backend.compiles == 2


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
def test_corrupt_file_is_detected_then_rebuilt(tmp_path, unit, cpu_device, damage):
    cache = ArtifactCache(tmp_path)
    backend = CountingEager()
    art = cache.build(backend, unit[0], cpu_device, CompileOptions())
    f = art.path / "program.pt2"
    data = f.read_bytes()
    if damage == "flip":
        f.write_bytes(data[:100] + bytes([data[100] ^ 0xFF]) + data[101:])
    elif damage == "truncate":
        f.write_bytes(data[: len(data) // 2])
    else:
        f.unlink()
    with pytest.raises(ArtifactCorrupt, match=r"program\.pt2"):
        cache.get(art.key)
    with pytest.raises(ArtifactCorrupt, match=r"program\.pt2"):
        cache.verify(art)
    again = cache.build(backend, unit[0], cpu_device, CompileOptions())
    assert backend.compiles == 2
    assert (again.path / "program.pt2").read_bytes() != b""
    cache.verify(again)
    u, env = unit
    out = backend.load(again, cpu_device)(*u.example_inputs)
    torch.testing.assert_close(out[0], env[u.outputs[0]])


def test_corrupt_manifest_is_reported(tmp_path, unit, cpu_device):
    cache = ArtifactCache(tmp_path)
    art = cache.build(CountingEager(), unit[0], cpu_device, CompileOptions())
    (art.path / MANIFEST).write_text("{not json")
    with pytest.raises(ArtifactCorrupt, match=MANIFEST):
        cache.get(art.key)
    with pytest.raises(ArtifactCorrupt, match="no artifact"):
        cache.get("eager-0000")


def test_failed_compile_leaves_nothing(tmp_path, unit, cpu_device):
    class Broken(EagerBackend):
        def compile(self, unit, device, options, out_dir):
            (out_dir / "half-written").write_bytes(b"x")
            raise RuntimeError("boom")

    cache = ArtifactCache(tmp_path)
    with pytest.raises(CompileError, match=r"p0.*local/cpu.*boom"):
        cache.build(Broken(), unit[0], cpu_device, CompileOptions())
    assert list(tmp_path.iterdir()) == []


def test_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "c"))
    assert ArtifactCache().root == tmp_path / "c"


def test_compile_units_in_processes_then_hits(tmp_path, unit, cpu_device, capfd, monkeypatch):
    """Two jobs in two spawned processes; the unit pickles, keys agree across processes. The
    workers unpickle treespecs quietly (torch's pytree deprecation warning is filtered in
    them, whatever the parent's environment says) and report each job finished."""
    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    cache = ArtifactCache(tmp_path)
    jobs = [
        CompileJob(unit[0], cpu_device, "eager"),
        CompileJob(unit[0], cpu_device, "eager", CompileOptions(dtype="float16")),
    ]
    seen = []
    arts = compile_units(
        jobs, cache, workers=2, progress=False, report=lambda d, n: seen.append((d, n))
    )
    assert seen == [(0, 2), (1, 2), (2, 2)]
    assert "LeafSpec" not in capfd.readouterr().err
    assert len({a.key for a in arts}) == 2
    again = compile_units(jobs, cache, workers=2, progress=False)  # all hits: no processes
    assert [a.key for a in again] == [a.key for a in arts]


def test_compile_error_names_partition_backend_and_device(tmp_path, unit, cpu_device):
    from hetero.cluster.spec import DeviceSpec

    gpu = DeviceSpec(name="local/gpu0", kind="gpu", host="local", model="mystery accelerator")
    with pytest.raises(CompileError) as e:
        compile_units([CompileJob(unit[0], gpu, "tvm")], ArtifactCache(tmp_path), progress=False)
    msg = str(e.value)
    assert "p0" in msg and "tvm" in msg and "local/gpu0" in msg and "arch" in msg
