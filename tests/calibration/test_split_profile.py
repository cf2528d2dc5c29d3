"""The split placement's calibration as the planner reads it: measured CPU rates per dtype
and the link's rate alone and with both at work become profile entries the cost model prices with."""

from __future__ import annotations

from pathlib import Path

from hetero.calibration.split import SplitRates, split_profile
from hetero.cluster.profile import CalibrationProfile
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.cost import CostModel

H200 = Path(__file__).resolve().parents[2] / "configs" / "clusters" / "h200-sxm-node.yaml"


def test_profile_prices_the_cpu_and_the_link_as_measured():
    cluster = ClusterSpec.from_yaml(H200)
    gpu, cpu = cluster.device("node0/gpu"), cluster.device("node0/cpu")
    rates = (
        SplitRates("float16", 1, 66e9, 53e9, 55e9, 53.4e9, handoff_s=60e-6),
        SplitRates("bfloat16", 1, 50e9, 30e9, 55e9, 54e9, handoff_s=70e-6),
    )
    cm = CostModel(split_profile(cluster, gpu, rates))
    _, mem16 = cm.efficiency(cpu, "matmul", "float16", "eager")
    _, mem_bf = cm.efficiency(cpu, "matmul", "bfloat16", "eager")
    assert mem16 * cpu.mem_bandwidth == 53e9 and mem_bf * cpu.mem_bandwidth == 30e9
    # the link alone (the slowest measured), its latency half the fastest hand-off
    t = cm.transfer_time(cluster, "node0/cpu", "node0/gpu", 1e9)
    assert abs(t - (30e-6 + 1e9 / 55e9)) < 1e-9
    # weights streamed beside the CPU's work: the link as measured with both at work
    assert abs(cm.stream_time(cluster, gpu, 1e9) - (30e-6 + 1e9 / 55e9)) < 1e-9
    assert abs(cm.stream_time(cluster, gpu, 1e9, beside="") - (30e-6 + 1e9 / 53.4e9)) < 1e-9
    # beside the CPU's rows in one dtype: the link's rate measured beside that dtype's matmuls
    bf16 = cm.stream_time(cluster, gpu, 1e9, beside="bfloat16")
    assert abs(bf16 - (30e-6 + 1e9 / 54e9)) < 1e-9


def test_the_profile_keeps_the_link_rate_per_dtype_through_its_file(tmp_path):
    cluster = ClusterSpec.from_yaml(H200)
    rates = (
        SplitRates("float16", 1, 66e9, 53e9, 55e9, 49e9),
        SplitRates("float32", 1, 90e9, 80e9, 55e9, 41e9),
    )
    profile = split_profile(cluster, cluster.device("node0/gpu"), rates)
    profile.to_json(tmp_path / "p.json")
    link = CalibrationProfile.load(tmp_path / "p.json").link("node0/cpu", "node0/gpu")
    assert link.shared_by_dtype == (("float16", 49e9), ("float32", 41e9))
    assert link.shared_rate("float16") == 49e9 and link.shared_rate() == 41e9
    assert link.shared_rate("bfloat16") == 41e9  # not measured: the slowest
