"""Where each device worker runs: ClusterSpec hosts -> Ray nodes, devices -> actor options.

Hosts map to alive Ray nodes by, in this order:
  1. an explicit `node_map` (host -> Ray node id, or a unique prefix of one);
  2. the host's name: `node-<first 8 hex of the NodeID>` (what `ClusterSpec.from_ray` names);
  3. a node label `hetero-host=<host>` (`ray start --labels='{"hetero-host": "a"}'`);
  4. otherwise each remaining host takes the first unused node that has the resources its
     devices need (GPU count, NPU count, a CPU); hosts with more accelerators choose
     first, ties in the cluster's order. Nodes are tried driver's node first, so a
     one-host YAML cluster lands where the caller runs.
Each GPU worker asks for `num_gpus=1`, each CPU worker for `num_cpus=cores` (capped by
the node's CPUs), each NPU worker for the custom resource `{"hetero_npu": 1}` (NPU_RESOURCE); all are pinned
with a hard NodeAffinitySchedulingStrategy. Workers that compute on the CPUs of a node
another such worker also computes on (`sharing_cores`) are told so: their idle OpenMP
threads sleep at once instead of spinning first (hetero/environment.py).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from hetero.cluster.devices import NPU_RESOURCE
from hetero.cluster.spec import DeviceSpec
from hetero.environment import child_env
from hetero.errors import PlanInfeasible

HOST_LABEL = "hetero-host"


@dataclass(frozen=True)
class RayNode:
    node_id: str
    resources: Mapping[str, float]
    labels: Mapping[str, str]
    address: str = ""

    @property
    def short(self) -> str:
        return f"node-{self.node_id[:8]}"


def alive_nodes() -> list[RayNode]:
    """Alive Ray nodes, the driver's node first, then in NodeID order."""
    import ray  # optional (hetero[ray]): loaded on first use

    here = ray.get_runtime_context().get_node_id()
    nodes = [
        RayNode(
            n["NodeID"],
            dict(n.get("Resources", {})),
            dict(n.get("Labels", {}) or {}),
            n.get("NodeManagerAddress", ""),
        )
        for n in ray.nodes()
        if n.get("Alive")
    ]
    return sorted(nodes, key=lambda n: (n.node_id != here, n.node_id))


def _needs(devices: Sequence[DeviceSpec]) -> Counter:
    need: Counter = Counter()
    for d in devices:
        if d.kind == "gpu":
            need["GPU"] += 1
        elif d.kind == "npu":
            need[NPU_RESOURCE] += 1
        else:
            need["CPU"] += 1
    return need


def _fits(node: RayNode, need: Counter) -> bool:
    return all(node.resources.get(k, 0) >= (v if k != "CPU" else 1) for k, v in need.items())


def map_hosts(
    devices: Sequence[DeviceSpec],
    nodes: Sequence[RayNode],
    node_map: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """host -> Ray node id for every host that `devices` live on."""
    hosts: dict[str, list[DeviceSpec]] = {}
    for d in devices:
        hosts.setdefault(d.host, []).append(d)
    out: dict[str, str] = {}

    def find(prefix: str) -> RayNode | None:
        hits = [n for n in nodes if n.node_id.startswith(prefix)]
        return hits[0] if len(hits) == 1 else None

    for host in hosts:
        node = None
        if node_map and host in node_map:
            node = find(node_map[host])
            if node is None:
                raise PlanInfeasible(
                    f"node_map sends host {host!r} to Ray node {node_map[host]!r}, which is not "
                    f"one alive node; alive: {', '.join(n.node_id[:8] for n in nodes)}"
                )
        elif host.startswith("node-"):
            node = find(host.removeprefix("node-"))
        if node is None:
            node = next((n for n in nodes if n.labels.get(HOST_LABEL) == host), None)
        if node is not None:
            out[host] = node.node_id
    used = set(out.values())
    # Hosts with accelerators choose first, so a CPU-only host never takes the only NPU node.
    rest = sorted(
        (h for h in hosts if h not in out),
        key=lambda h: -sum(v for k, v in _needs(hosts[h]).items() if k != "CPU"),
    )
    for host in rest:
        devs = hosts[host]
        need = _needs(devs)
        node = next((n for n in nodes if n.node_id not in used and _fits(n, need)), None)
        if node is None:
            have = "; ".join(
                f"{n.short}: "
                + ", ".join(
                    f"{k}={v:g}"
                    for k, v in sorted(n.resources.items())
                    if k in ("CPU", "GPU", NPU_RESOURCE)
                )
                for n in nodes
            )
            raise PlanInfeasible(
                f"no free Ray node can hold host {host!r} (needs "
                + ", ".join(f"{k}>={v}" for k, v in sorted(need.items()))
                + f"); alive nodes: {have or 'none'}. Start a node with these resources, "
                f"label one `{HOST_LABEL}={host}`, or pass node_map."
            )
        out[host] = node.node_id
        used.add(node.node_id)
    return out


# Device kinds whose worker computes on its node's CPUs (NPUs here are emulated on them).
_ON_HOST_CPUS = frozenset({"cpu", "npu"})


def sharing_cores(devices: Sequence[DeviceSpec], host_node: Mapping[str, str]) -> frozenset[str]:
    """Names of the devices whose worker computes on a node's CPUs together with another
    device's worker (hosts mapped to nodes by `map_hosts`): the demo's CPU and emulated
    NPU on one machine. Two such processes on two cores ran the demo model 6.6 ms per
    forward each spinning first, 3.2 sleeping at once (results/thread_wait*.json)."""
    on_cpus = [d for d in devices if d.kind in _ON_HOST_CPUS]
    per_node = Counter(host_node[d.host] for d in on_cpus)
    return frozenset(d.name for d in on_cpus if per_node[host_node[d.host]] > 1)


def actor_options(
    device: DeviceSpec, node: RayNode, *, max_restarts: int = 2, shares_cores: bool = False
) -> dict[str, Any]:
    """Ray actor options for the worker that owns `device` on `node`; `shares_cores`: it
    computes on the node's CPUs beside another worker (`sharing_cores`)."""
    # optional (hetero[ray]): loaded on first use
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    opts: dict[str, Any] = {
        "scheduling_strategy": NodeAffinitySchedulingStrategy(node.node_id, soft=False),
        "max_restarts": max_restarts,
        "max_task_retries": 0,  # the executor retries a request itself, once, over a new graph
        "num_cpus": 0,
        # How idle OpenMP threads wait (a bounded spin, none beside another worker): OpenMP
        # reads it when torch loads, so it is set before the worker starts, with the
        # filters for warnings nobody can act on (hetero/environment.py).
        "runtime_env": {"env_vars": child_env(shares_cores=shares_cores)},
    }
    if device.kind == "gpu":
        opts["num_gpus"] = 1
    elif device.kind == "npu":
        opts["resources"] = {NPU_RESOURCE: 1}
    else:
        opts["num_cpus"] = max(1, min(device.cores or 1, int(node.resources.get("CPU", 1))))
    return opts
