"""Host -> Ray node mapping, actor options and transports: pure functions, no cluster."""

from __future__ import annotations

import dataclasses

import pytest

from hetero.cluster.devices import NPU_RESOURCE
from hetero.cluster.spec import ClusterSpec
from hetero.environment import FILLED, OWN_CORES, SPIN_COUNT
from hetero.errors import PlanInfeasible
from hetero.runtime.placement import (
    HOST_LABEL,
    RayNode,
    actor_options,
    map_hosts,
    sharing_cores,
)
from hetero.runtime.stage import StageSpec
from hetero.runtime.transfer import edge_transport, host_out

HEAD = RayNode("aaaaaaaa" + "0" * 48, {"CPU": 4}, {})
NPU = RayNode("bbbbbbbb" + "1" * 48, {"CPU": 2, NPU_RESOURCE: 1}, {})
GPU = RayNode("cccccccc" + "2" * 48, {"CPU": 8, "GPU": 2}, {HOST_LABEL: "gpubox"})


def test_hosts_map_by_resources_in_order(cluster):
    # "head" needs only a CPU and takes the first node; "edge" needs the NPU.
    got = map_hosts(cluster.devices, [HEAD, NPU])
    assert got == {"head": HEAD.node_id, "edge": NPU.node_id}
    # Listed the other way round, the NPU host still finds the NPU node.
    assert map_hosts(cluster.devices, [NPU, HEAD])["edge"] == NPU.node_id


def test_hosts_map_by_name_label_and_explicit_map(cluster):
    ray_named = [dataclasses.replace(d, host="node-bbbbbbbb") for d in cluster.devices]
    assert set(map_hosts(ray_named, [HEAD, NPU]).values()) == {NPU.node_id}
    gpu = ClusterSpec.from_dict(
        {
            "name": "g",
            "hosts": [
                {
                    "name": "gpubox",
                    "devices": [
                        {"name": "cpu", "kind": "cpu", "bandwidth": "1 GB/s", "memory": "1 GB"},
                        {"name": "gpu", "kind": "gpu", "bandwidth": "1 TB/s", "memory": "8 GB"},
                    ],
                    "links": [{"between": ["cpu", "gpu"], "bandwidth": "25 GB/s"}],
                }
            ],
        }
    )
    assert map_hosts(gpu.devices, [HEAD, NPU, GPU]) == {"gpubox": GPU.node_id}
    assert map_hosts(cluster.devices, [HEAD, NPU], {"head": "bbbb", "edge": "bbbb"}) == {
        "head": NPU.node_id,
        "edge": NPU.node_id,
    }


def test_unplaceable_host_says_what_is_missing(cluster):
    with pytest.raises(PlanInfeasible, match=r"host 'edge' \(needs CPU>=1, hetero_npu>=1\)"):
        map_hosts(cluster.devices, [HEAD])
    with pytest.raises(PlanInfeasible, match="not one alive node"):
        map_hosts(cluster.devices, [HEAD, NPU], {"edge": "zzzz"})


def test_actor_options_follow_the_device_kind(cluster):
    cpu = actor_options(cluster.device("head/cpu"), HEAD)
    npu = actor_options(cluster.device("edge/npu"), NPU, max_restarts=5)
    assert cpu["num_cpus"] == 1 and "num_gpus" not in cpu
    assert npu["resources"] == {NPU_RESOURCE: 1} and npu["num_cpus"] == 0
    assert npu["max_restarts"] == 5 and npu["max_task_retries"] == 0
    assert npu["scheduling_strategy"].node_id == NPU.node_id
    assert not npu["scheduling_strategy"].soft
    big = dataclasses.replace(cluster.device("head/cpu"), cores=64)
    assert actor_options(big, HEAD)["num_cpus"] == 4  # capped by the node


def test_workers_computing_on_one_nodes_cpus_are_told_they_share_them(cluster, monkeypatch):
    for var in (SPIN_COUNT, FILLED):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv(OWN_CORES, "1")  # the person owns the cores: lone workers may spin
    apart = {"head": HEAD.node_id, "edge": NPU.node_id}
    # edge's CPU and its (emulated) NPU compute on one node's CPUs; head's CPU is alone
    assert sharing_cores(cluster.devices, apart) == {"edge/cpu", "edge/npu"}
    together = {"head": HEAD.node_id, "edge": HEAD.node_id}
    assert sharing_cores(cluster.devices, together) == {"head/cpu", "edge/cpu", "edge/npu"}
    gpu = dataclasses.replace(cluster.device("edge/cpu"), kind="gpu")
    assert sharing_cores([cluster.device("head/cpu"), gpu], together) == set()

    def spin(shares: bool) -> str:
        opts = actor_options(cluster.device("edge/cpu"), NPU, shares_cores=shares)
        return opts["runtime_env"]["env_vars"][SPIN_COUNT]

    assert (spin(False), spin(True)) == ("300000", "0")


def test_nccl_only_between_gpus(staged):
    stages, *_ = staged
    gpu = dataclasses.replace(stages[0].device, kind="gpu")

    def on(s: StageSpec, dev):
        return dataclasses.replace(s, device=dev)

    a, b = on(stages[0], gpu), on(stages[1], gpu)
    assert edge_transport(a, [b], to_caller=False) == "nccl"
    assert not host_out(a, [b], to_caller=False)
    assert edge_transport(a, [b], to_caller=True) is None
    assert edge_transport(a, [stages[1]], to_caller=False) is None
    assert host_out(a, [stages[1]], to_caller=False)
