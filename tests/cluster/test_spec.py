"""Cluster descriptions: shipped files load, topology and transfers, errors name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hetero import Cluster
from hetero.cluster.units import parse_bandwidth, parse_bytes, parse_flops, parse_seconds
from hetero.errors import ConfigError

CLUSTERS = sorted((Path(__file__).parents[2] / "configs" / "clusters").glob("*.yaml"))


@pytest.mark.parametrize("path", CLUSTERS, ids=lambda p: p.stem)
def test_shipped_clusters_load(path):
    c = Cluster.from_yaml(path)
    assert c.devices and all(d.mem_bandwidth > 0 and d.memory > 0 for d in c.devices)
    for a in c.devices:
        for b in c.devices:
            assert c.transfer_time(a.name, b.name, 1e6) >= 0


def test_units():
    assert parse_bandwidth("3.35 TB/s") == pytest.approx(3.35e12)
    assert parse_bytes("80 GiB") == 80 * 2**30
    assert parse_flops("989 TFLOPS") == pytest.approx(989e12)
    assert parse_seconds("5 us") == pytest.approx(5e-6)


def test_nvlink_route_and_transfer_time():
    c = Cluster.from_yaml(next(p for p in CLUSTERS if p.stem == "2gpu-nvlink"))
    (link,) = c.route("node0/gpu0", "node0/gpu1")
    assert link.kind == "nvlink"
    t = c.transfer_time("node0/gpu0", "node0/gpu1", 450e9)
    assert t == pytest.approx(1.0 + 3e-6)


def test_multi_host_routes_through_the_network(tmp_path):
    f = tmp_path / "two.yaml"
    f.write_text(
        """
name: two
network: {bandwidth: 10 GB/s, latency: 50 us}
hosts:
  - name: a
    devices:
      - {name: cpu, kind: cpu, bandwidth: 20 GB/s, memory: 8 GB}
      - {name: gpu, kind: gpu, bandwidth: 1 TB/s, memory: 16 GB}
    links: [{between: [gpu, cpu], bandwidth: 25 GB/s, latency: 10 us}]
  - name: b
    devices:
      - {name: cpu, kind: cpu, bandwidth: 20 GB/s, memory: 8 GB}
"""
    )
    c = Cluster.from_yaml(f)
    kinds = [l.kind for l in c.route("a/gpu", "b/cpu")]
    assert kinds == ["pcie", "network"]
    assert c.transfer_time("a/gpu", "b/cpu", 1e9) == pytest.approx(60e-6 + 0.1)


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: tpu, bandwidth: 1, memory: 1}]}]",
            "hosts.0.devices.0.kind",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: fast, memory: 1}]}]",
            "bandwidth",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, memory: 1}]}]",
            "required key is missing",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwith: 1, memory: 1}]}]",
            "unknown key",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: g, kind: gpu, bandwidth: 1, memory: 1}]}]",
            "has no cpu device",
        ),
        (
            "name: x\nhosts:\n - {name: h, devices: [{name: c, kind: cpu, bandwidth: 1, memory: 1}], links: [{between: [c, gpu], bandwidth: 1}]}",
            "no device 'gpu'",
        ),
        ("name: [unclosed", "not valid YAML"),
    ],
)
def test_malformed_cluster_yaml_names_file_and_key(tmp_path, text, expect):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        Cluster.from_yaml(f)
    msg = str(info.value)
    assert str(f) in msg and expect in msg, msg


def test_local_cluster_has_this_cpu():
    c = Cluster.local()
    cpu = c.of_kind("cpu")[0]
    assert cpu.cores >= 1 and cpu.memory > 0


def test_the_cluster_description_imports_without_torch():
    """The bottom layer: the spec, its discovery and calibration profiles load no torch (a
    fresh interpreter: this one has torch loaded already)."""
    code = (
        "import sys, hetero.cluster.spec, hetero.cluster.discover, hetero.cluster.profile\n"
        "heavy = sorted(m for m in ('torch', 'ray', 'tvm', 'triton') if m in sys.modules)\n"
        "above = sorted(m for m in sys.modules if m.startswith('hetero.')\n"
        "               and not m.startswith(('hetero.cluster', 'hetero.errors', 'hetero.paths')))\n"
        "print(heavy, above)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] []", out.stdout + out.stderr
