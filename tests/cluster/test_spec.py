"""Cluster descriptions: shipped files load, topology and transfers, errors name file and key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hetero import Cluster
from hetero.cluster.units import (
    UnitError,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_seconds,
)
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


DEV = "{name: c, kind: cpu, bandwidth: 20 GB/s, memory: 8 GB"


@pytest.mark.parametrize(
    ("text", "expect"),
    [
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: tpu, bandwidth: 1 GB/s, memory: 1 GB}]}]",
            "hosts.0.devices.0.kind",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpuu, bandwidth: 1 GB/s, memory: 1 GB}]}]",
            "did you mean 'cpu'?",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: fast, memory: 1 GB}]}]",
            "bandwidth",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, memory: 1 GB}]}]",
            "required key is missing",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwith: 1 GB/s, memory: 1 GB}]}]",
            "hosts.0.devices.0.bandwith: unknown key (did you mean 'bandwidth'?)",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: g, kind: gpu, bandwidth: 1 TB/s, memory: 1 GB}]}]",
            "has no cpu device",
        ),
        (
            "name: x\nhosts:\n - {name: h, devices: [{name: c, kind: cpu, bandwidth: 1 GB/s, memory: 1 GB}], links: [{between: [c, gpu], bandwidth: 1 GB/s}]}",
            "no device 'gpu'",
        ),
        ("name: [unclosed", "not valid YAML"),
        # numbers without units: refused, with the number and a plausible unit suggested
        (
            f"name: x\nhosts: [{{name: h, devices: [{DEV}, launch_overhead: 5}}]}}]",
            "did you mean '5 us'?",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: 20 GB/s, memory: 24}]}]",
            "hosts.0.devices.0.memory: 24 has no unit; a size needs one (GB, GiB, MB, MiB, ...): did you mean '24 GB'?",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: 20000, memory: 1 GB}]}]",
            "hosts.0.devices.0.bandwidth: 20000 has no unit; a bandwidth needs one",
        ),
        # the wrong kind of quantity, and a misspelt unit
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: 20 GB, memory: 1 GB}]}]",
            "'20 GB' is a size, not a bandwidth: did you mean '20 GB/s'?",
        ),
        (
            "name: x\nhosts: [{name: h, devices: [{name: c, kind: cpu, bandwidth: 20 GBs, memory: 1 GB}]}]",
            "did you mean '20 GB/s'?",
        ),
    ],
)
def test_malformed_cluster_yaml_names_file_and_key(tmp_path, text, expect):
    f = tmp_path / "bad.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as info:
        Cluster.from_yaml(f)
    msg = str(info.value)
    assert str(f) in msg and expect in msg, msg


def test_units_read_with_pint_and_refuse_bare_numbers():
    assert parse_bandwidth("100 Gb/s") == pytest.approx(12.5e9)  # bits
    assert parse_seconds("5 µs") == parse_seconds("5 us") == pytest.approx(5e-6)
    assert parse_flops("6 TOPS") == pytest.approx(6e12)
    assert parse_bytes("8 KiB") == 8192 and parse_bytes(0) == 0
    for bad, words in [
        (24, "did you mean '24 GB'"),
        ("1,5 GB", "decimal point"),
        ("GB", "no number"),
        ("-1 GB", "negative"),
        ("80 GB/s", "a bandwidth, not a size"),
    ]:
        with pytest.raises(UnitError, match=words):
            parse_bytes(bad)
    with pytest.raises(UnitError, match="did you mean '20000 MB/s'"):
        parse_bandwidth(20000)
    with pytest.raises(UnitError, match="did you mean '1 TFLOPS'"):
        parse_flops(1e12)


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
