"""ClusterSpec: the devices of a cluster and the links between them.

The bottom layer (no torch, no Ray at import time, nothing above `cluster/`), so planning
runs anywhere. Read from
YAML (`ClusterSpec.from_yaml`), discovered on this machine (`ClusterSpec.local`) or
from a running Ray cluster (`ClusterSpec.from_ray`).
"""

from __future__ import annotations

import functools
import itertools
import os
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import networkx as nx
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hetero.cluster import discover
from hetero.cluster.devices import DEVICE_KINDS, DeviceKind, DeviceSpec, LinkSpec
from hetero.cluster.schema import Bandwidth, Bytes, Flops, Seconds, format_errors
from hetero.errors import ConfigError

__all__ = ["DEVICE_KINDS", "ClusterSpec", "DeviceKind", "DeviceSpec", "LinkSpec", "read_yaml"]


@dataclass(frozen=True)
class ClusterSpec:
    """Devices and links of a cluster, with its topology as a networkx graph."""

    name: str
    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...] = ()
    source: str = ""  # the file it came from, for messages
    _topology: Any = field(default=None, compare=False, repr=False, hash=False)

    def __post_init__(self) -> None:
        names = [d.name for d in self.devices]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ConfigError(f"{self._where()}: device names must be unique; repeated: {dupes}")
        g = nx.Graph()
        for d in self.devices:
            g.add_node(d.name, device=d)
        for link in self.links:
            for end in (link.a, link.b):
                if end not in g:
                    raise ConfigError(
                        f"{self._where()}: link {link.a} <-> {link.b} names unknown device "
                        f"{end!r}; known: {', '.join(names)}"
                    )
            g.add_edge(link.a, link.b, link=link, weight=link.latency + 1.0 / link.bandwidth)
        if len(self.devices) > 1 and not nx.is_connected(g):
            parts = [sorted(c) for c in nx.connected_components(g)]
            raise ConfigError(
                f"{self._where()}: the devices do not form one connected topology: {parts}. "
                "Add `links:` between them (or a `network:` between hosts)."
            )
        object.__setattr__(self, "_topology", g)

    def _where(self) -> str:
        return self.source or f"cluster {self.name!r}"

    # ---- lookups -------------------------------------------------------------------------
    @property
    def topology(self) -> nx.Graph:
        return self._topology

    @property
    def hosts(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(d.host for d in self.devices))

    def device(self, name: str) -> DeviceSpec:
        for d in self.devices:
            if d.name == name or (d.short == name and len(self.hosts) == 1):
                return d
        raise ConfigError(
            f"{self._where()}: no device {name!r}; known: {', '.join(d.name for d in self.devices)}"
        )

    def of_kind(self, kind: str) -> tuple[DeviceSpec, ...]:
        return tuple(d for d in self.devices if d.kind == kind)

    def host_cpu(self, host: str) -> DeviceSpec | None:
        for d in self.devices:
            if d.host == host and d.kind == "cpu":
                return d
        return None

    # ---- transfers -----------------------------------------------------------------------
    def route(self, src: str, dst: str) -> tuple[LinkSpec, ...]:
        """The links a tensor crosses from `src` to `dst` (lowest latency + 1/bandwidth path)."""
        if src == dst:
            return ()
        return _route(self, src, dst)

    def transfer_time(self, src: str, dst: str, nbytes: float) -> float:
        """Seconds to move `nbytes` from `src` to `dst`.

        Latencies add up along the path; the bytes stream through it pipelined in
        chunks, so the slowest link sets the rate (staged copies through host memory
        overlap with the next hop the way NCCL and Ray's channels chunk them).
        """
        links = self.route(src, dst)
        if not links or nbytes <= 0:
            return 0.0
        return sum(l.latency for l in links) + nbytes / min(l.bandwidth for l in links)

    def link_bandwidth(self, src: str, dst: str) -> float:
        links = self.route(src, dst)
        return min((l.bandwidth for l in links), default=float("inf"))

    # ---- edits (new values; specs are frozen) --------------------------------------------
    def without(self, names: Iterable[str]) -> ClusterSpec:
        """The cluster less some devices (for excluded devices and re-planning)."""
        drop = {self.device(n).name for n in names}
        return ClusterSpec(
            name=self.name,
            devices=tuple(d for d in self.devices if d.name not in drop),
            links=tuple(l for l in self.links if l.a not in drop and l.b not in drop),
            source=self.source,
        )

    def with_device(self, name: str, **changes: Any) -> ClusterSpec:
        """A copy where one device's fields are replaced (e.g. a memory cap)."""
        target = self.device(name).name
        devices = tuple(replace(d, **changes) if d.name == target else d for d in self.devices)
        return ClusterSpec(self.name, devices, self.links, self.source)

    # ---- constructors --------------------------------------------------------------------
    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> ClusterSpec:
        p = Path(path)
        return cls.from_dict(read_yaml(p, "the cluster file"), source=str(p))

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> ClusterSpec:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: a cluster description is a mapping with `hosts:`")
        try:
            doc = _ClusterDoc.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_errors(source, "cluster description", e)) from None
        return doc.build(source)

    @classmethod
    def local(cls, include_gpus: bool = True) -> ClusterSpec:
        """This machine: its CPU (cores, memory) and, when torch sees CUDA, its GPUs."""
        return cls(*discover.local_devices(include_gpus=include_gpus))

    @classmethod
    def from_ray(cls, address: str | None = None) -> ClusterSpec:
        """The nodes of a running Ray cluster, with their CPUs, GPUs and `NPU` resources."""
        return cls(*discover.ray_devices(address))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "devices": [
                {
                    "name": d.name,
                    "kind": d.kind,
                    "host": d.host,
                    "model": d.model,
                    "peak_flops": dict(d.peak_flops),
                    "mem_bandwidth": d.mem_bandwidth,
                    "memory": d.memory,
                    "launch_overhead": d.launch_overhead,
                    "dtypes": list(d.dtypes),
                    "cores": d.cores,
                    "index": d.index,
                    "emulated": d.emulated,
                }
                for d in self.devices
            ],
            "links": [
                {"a": l.a, "b": l.b, "bandwidth": l.bandwidth, "latency": l.latency, "kind": l.kind}
                for l in self.links
            ],
        }

    def summary(self) -> str:
        lines = [f"cluster {self.name}: {len(self.devices)} devices on {len(self.hosts)} host(s)"]
        for d in self.devices:
            tflops = d.peak("float16" if d.kind != "cpu" else "float32") / 1e12
            lines.append(
                f"  {d.name:<18} {d.kind:<4} {d.model[:28]:<28} {tflops:8.2f} TFLOP/s "
                f"{d.mem_bandwidth / 1e9:8.1f} GB/s {d.memory / 2**30:7.1f} GiB"
                + (" (emulated)" if d.emulated else "")
            )
        return "\n".join(lines)


# Kept out of the frozen dataclass so the cached value never rides along in pickles.
@functools.lru_cache(maxsize=4096)
def _route(cluster: ClusterSpec, src: str, dst: str) -> tuple[LinkSpec, ...]:
    g = cluster.topology
    for end in (src, dst):
        if end not in g:
            raise ConfigError(f"{cluster._where()}: no device {end!r} in the topology")
    path = nx.shortest_path(g, src, dst, weight="weight")
    return tuple(g.edges[u, v]["link"] for u, v in itertools.pairwise(path))


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file; a missing file or bad YAML is a ConfigError naming the file."""
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what} ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None


# ---- the YAML schema ---------------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class _DeviceDoc(_Strict):
    name: str
    kind: DeviceKind
    count: int = Field(1, ge=1)
    model: str = ""
    peak_flops: dict[str, Flops] = Field(default_factory=dict)
    bandwidth: Bandwidth = Field(description="memory bandwidth, e.g. 3.35 TB/s")
    memory: Bytes = Field(description="usable memory, e.g. 80 GB")
    launch_overhead: Seconds = "5 us"
    dtypes: list[str] | None = None
    cores: int = 0
    emulated: bool | None = None
    mcpu: str = ""


class _LinkDoc(_Strict):
    between: tuple[str, str]
    bandwidth: Bandwidth
    latency: Seconds = "5 us"
    kind: Literal["pcie", "nvlink", "network", "memory", "chip"] = "pcie"


class _HostDoc(_Strict):
    name: str
    devices: list[_DeviceDoc]
    links: list[_LinkDoc] = Field(default_factory=list)


class _NetworkDoc(_Strict):
    bandwidth: Bandwidth
    latency: Seconds = "10 us"


class _ClusterDoc(_Strict):
    name: str
    hosts: list[_HostDoc] = Field(min_length=1)
    network: _NetworkDoc | None = None

    def build(self, source: str) -> ClusterSpec:
        devices: list[DeviceSpec] = []
        links: list[LinkSpec] = []
        for hi, host in enumerate(self.hosts):
            groups: dict[str, list[str]] = {}
            counters: dict[str, int] = {}
            for d in host.devices:
                members = []
                for i in range(d.count):
                    short = f"{d.name}{i}" if d.count > 1 else d.name
                    members.append(f"{host.name}/{short}")
                    index = counters.get(d.kind, 0)
                    counters[d.kind] = index + 1
                    default_dtypes = {
                        "gpu": ["float32", "float16", "bfloat16"],
                        "cpu": ["float32", "bfloat16", "float16"],
                        "npu": ["float16", "int8"],
                    }[d.kind]
                    devices.append(
                        DeviceSpec(
                            name=f"{host.name}/{short}",
                            kind=d.kind,
                            host=host.name,
                            model=d.model,
                            peak_flops=tuple(sorted(d.peak_flops.items())),
                            mem_bandwidth=float(d.bandwidth),
                            memory=float(d.memory),
                            launch_overhead=float(d.launch_overhead),
                            dtypes=tuple(d.dtypes or default_dtypes),
                            cores=d.cores,
                            index=index,
                            emulated=d.kind == "npu" if d.emulated is None else d.emulated,
                            mcpu=d.mcpu,
                        )
                    )
                if d.name in groups:
                    raise ConfigError(
                        f"{source}: hosts[{hi}] ({host.name}): device name {d.name!r} is used twice"
                    )
                groups[d.name] = members
            for li, link in enumerate(host.links):
                ends = []
                for end in link.between:
                    if end in groups:
                        ends.append(groups[end])
                    elif f"{host.name}/{end}" in {m for ms in groups.values() for m in ms}:
                        ends.append([f"{host.name}/{end}"])
                    else:
                        raise ConfigError(
                            f"{source}: hosts[{hi}].links[{li}].between: no device {end!r} on host "
                            f"{host.name}; known: {', '.join(groups)}"
                        )
                pairs = (
                    itertools.combinations(ends[0], 2)
                    if link.between[0] == link.between[1]
                    else itertools.product(ends[0], ends[1])
                )
                for a, b in pairs:
                    links.append(
                        LinkSpec(a, b, float(link.bandwidth), float(link.latency), link.kind)
                    )
            if not any(d.kind == "cpu" for d in host.devices):
                raise ConfigError(
                    f"{source}: hosts[{hi}] ({host.name}) has no cpu device; every host needs one "
                    "(its CPU drives the accelerators and carries network traffic)"
                )
        cpus = [
            next(d.name for d in devices if d.host == h.name and d.kind == "cpu")
            for h in self.hosts
        ]
        if len(cpus) > 1:
            if self.network is None:
                raise ConfigError(
                    f"{source}: {len(cpus)} hosts but no `network:` (bandwidth, latency) between them"
                )
            for a, b in itertools.combinations(cpus, 2):
                links.append(
                    LinkSpec(
                        a, b, float(self.network.bandwidth), float(self.network.latency), "network"
                    )
                )
        return ClusterSpec(
            name=self.name, devices=tuple(devices), links=tuple(links), source=source
        )


def host_platform() -> str:
    return f"{platform.system()} {platform.machine()}"
