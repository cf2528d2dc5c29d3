"""Identical devices and identical hosts: what makes a cluster of 144 devices a small problem.

Two devices are interchangeable when everything the cost model sees of them is equal: their
spec up to name (kind, model, rates, memory, dtypes, ...), the backend that runs there, and
their place in the topology. Such devices form a *device class*; a host whose devices and
links are equal to another's up to names has the same *host type*. The caller's device (the
origin: inputs come from it, outputs return to it) is a class of its own, so its host is a
type of its own.

The planner then works with counts ("8 GPUs of class 1 on each of 15 hosts of type 1")
instead of names and places stages onto names last (`Layout.assign`). It needs costs between
instances only by their relation: two instances on one host, or on two hosts of given types.
`Symmetry.reduced()` keeps just enough representatives to price every such relation (two
hosts per type, two instances per class and host), so the cost model runs on a handful of
devices, not on all of them.

What is checked (else the structure is not used, see `Symmetry.regular`): inside a host,
links between two classes are all-or-none with one link kind/rate; between hosts, one uniform
network joins every pair of hosts through the same class of device on each side (the YAML
`network:` key builds exactly this).
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Collection, Mapping
from dataclasses import dataclass, replace

from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.partitioner.decisions import BackendAssignment

REPRESENTATIVES = 2  # instances per class and hosts per type that the reduced cluster keeps


@dataclass(frozen=True)
class Slot:
    """Where an instance sits, as the planner sees it: class, host type, and which host of
    that type and which instance of the class on that host (both in name order)."""

    cls: int
    host_type: int
    host: int
    instance: int


@dataclass(frozen=True)
class Symmetry:
    """Device classes and host types of one cluster (see the module docstring)."""

    cluster: ClusterSpec
    origin: str  # the caller's device
    classes: tuple[tuple[str, ...], ...]  # per class: its members, in cluster order
    class_kind: tuple[str, ...]
    host_types: tuple[tuple[str, ...], ...]  # per type: its hosts, in cluster order
    counts: tuple[tuple[int, ...], ...]  # [type][class]: instances on one host of that type
    slots: Mapping[str, Slot]  # device name -> slot, in cluster order
    names: Mapping[Slot, str]  # slot -> device name
    regular: bool  # the checks of the module docstring hold; False: no structure is used
    why: str = ""  # what broke regularity, for notes

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def num_types(self) -> int:
        return len(self.host_types)

    def describe(self) -> str:
        """One line for people: '3 device classes (128x gpu, 1x cpu (the caller's), 15x cpu)
        on 16 host(s) of 2 type(s)'."""
        parts = []
        for c, members in enumerate(self.classes):
            mark = " (the caller's)" if members == (self.origin,) else ""
            parts.append(f"{len(members)}x {self.class_kind[c]}{mark}")
        hosts = sum(len(h) for h in self.host_types)
        return (
            f"{len(self.classes)} device classes ({', '.join(parts)}) on {hosts} host(s) "
            f"of {len(self.host_types)} type(s)"
        )

    def reduced(self) -> tuple[ClusterSpec, dict[str, Slot]]:
        """The cluster less everything but the representatives, and their slots: per host
        type its first `REPRESENTATIVES` hosts, on each the first `REPRESENTATIVES`
        instances of every class (the origin always)."""
        keep = [
            name
            for name, s in self.slots.items()
            if s.host < REPRESENTATIVES and s.instance < REPRESENTATIVES
        ]
        keep_set = set(keep) | {self.origin}
        drop = [d.name for d in self.cluster.devices if d.name not in keep_set]
        small = self.cluster.without(drop) if drop else self.cluster
        return small, {d.name: self.slots[d.name] for d in small.devices}


def analyse(
    cluster: ClusterSpec,
    backends: BackendAssignment,
    *,
    origin: str,
    distinct: Collection[str] = (),
) -> Symmetry:
    """Classes and host types of `cluster`. `backends`: the backend each device kind runs
    (resolved); `distinct`: devices to keep apart (pinned targets, devices a calibration
    profile names); the origin is always apart."""
    apart = set(distinct) | {origin}

    def key(d: DeviceSpec, irregular: frozenset[str]) -> tuple:
        own = d.name if d.name in apart or d.host in irregular else ""
        return (replace(d, name="", host="", index=0), backends.for_device(d), own)

    irregular: frozenset[str] = frozenset()
    why = ""
    for _ in range(2):  # a second pass only when a host's links broke its classes
        classes, class_of = _classes(cluster, lambda d, irr=irregular: key(d, irr))
        bad = {h: w for h in cluster.hosts if (w := _host_irregular(cluster, h, class_of))}
        if not bad:
            break
        irregular = frozenset(bad)
        why = "; ".join(f"{h}: {w}" for h, w in bad.items())
    kinds = tuple(cluster.device(members[0]).kind for members in classes)

    types, type_of = _host_types(cluster, class_of)
    network_ok, net_why = _network_uniform(cluster, class_of, type_of)
    if not network_ok:
        # every host a type of its own: still exact, the DP then tracks hosts one by one
        types = tuple((h,) for h in cluster.hosts)
        type_of = {h: i for i, h in enumerate(cluster.hosts)}
        why = "; ".join(x for x in (why, net_why) if x)

    counts = []
    for hosts in types:
        first = hosts[0]
        counts.append(
            tuple(sum(1 for m in members if cluster.device(m).host == first) for members in classes)
        )
    slots: dict[str, Slot] = {}
    host_index = {h: hosts.index(h) for hosts in types for h in hosts}
    seen: dict[tuple[str, int], int] = {}
    for d in cluster.devices:
        c = class_of[d.name]
        i = seen.get((d.host, c), 0)
        seen[(d.host, c)] = i + 1
        slots[d.name] = Slot(c, type_of[d.host], host_index[d.host], i)
    return Symmetry(
        cluster=cluster,
        origin=origin,
        classes=classes,
        class_kind=kinds,
        host_types=types,
        counts=tuple(counts),
        slots=slots,
        names={s: name for name, s in slots.items()},
        regular=not why,
        why=why,
    )


def _classes(cluster: ClusterSpec, key) -> tuple[tuple[tuple[str, ...], ...], dict[str, int]]:
    ids: dict[tuple, int] = {}
    members: list[list[str]] = []
    class_of: dict[str, int] = {}
    for d in cluster.devices:
        k = key(d)
        if k not in ids:
            ids[k] = len(members)
            members.append([])
        members[ids[k]].append(d.name)
        class_of[d.name] = ids[k]
    return tuple(tuple(m) for m in members), class_of


def _link_desc(link) -> tuple:
    return (link.bandwidth, link.latency, link.kind)


def _host_irregular(cluster: ClusterSpec, host: str, class_of: Mapping[str, int]) -> str:
    """'' when links between any two classes on `host` are all-or-none and all alike."""
    devices = [d.name for d in cluster.devices if d.host == host]
    on_host = set(devices)
    links: dict[frozenset[str], list] = {}
    for link in cluster.links:
        if link.a in on_host and link.b in on_host:
            links.setdefault(frozenset((link.a, link.b)), []).append(_link_desc(link))
    by_pair: dict[tuple[int, int], set] = {}
    for a, b in itertools.combinations(devices, 2):
        ca, cb = sorted((class_of[a], class_of[b]))
        found = links.get(frozenset((a, b)))
        by_pair.setdefault((ca, cb), set()).add(tuple(sorted(found)) if found else None)
    for (ca, cb), descs in by_pair.items():
        if len(descs) > 1:
            return f"links between its class-{ca} and class-{cb} devices differ"
    return ""


def _host_types(
    cluster: ClusterSpec, class_of: Mapping[str, int]
) -> tuple[tuple[tuple[str, ...], ...], dict[str, int]]:
    def signature(host: str) -> tuple:
        devices = [d.name for d in cluster.devices if d.host == host]
        on_host = set(devices)
        counts = tuple(sorted(Counter(class_of[d] for d in devices).items()))
        links = sorted(
            (*sorted((class_of[l.a], class_of[l.b])), *_link_desc(l))
            for l in cluster.links
            if l.a in on_host and l.b in on_host
        )
        return counts, tuple(links)

    ids: dict[tuple, int] = {}
    types: list[list[str]] = []
    type_of: dict[str, int] = {}
    for h in cluster.hosts:
        s = signature(h)
        if s not in ids:
            ids[s] = len(types)
            types.append([])
        types[ids[s]].append(h)
        type_of[h] = ids[s]
    return tuple(tuple(t) for t in types), type_of


def _network_uniform(
    cluster: ClusterSpec, class_of: Mapping[str, int], type_of: Mapping[str, int]
) -> tuple[bool, str]:
    """One link of one kind/rate between every two hosts, ending on each host at one device
    whose class depends only on the host's type."""
    hosts = cluster.hosts
    if len(hosts) <= 1:
        return True, ""
    host_of = {d.name: d.host for d in cluster.devices}
    cross = [l for l in cluster.links if host_of[l.a] != host_of[l.b]]
    descs = {_link_desc(l) for l in cross}
    if len(descs) != 1:
        return False, "the links between hosts are not all alike"
    pairs = {frozenset((host_of[l.a], host_of[l.b])) for l in cross}
    if len(pairs) != len(cross) or len(pairs) != len(hosts) * (len(hosts) - 1) // 2:
        return False, "not every two hosts share exactly one network link"
    ends: dict[str, set[str]] = {}
    for l in cross:
        ends.setdefault(host_of[l.a], set()).add(l.a)
        ends.setdefault(host_of[l.b], set()).add(l.b)
    end_class: dict[int, set[int]] = {}
    for h, devs in ends.items():
        if len(devs) != 1:
            return False, f"host {h} reaches the network through more than one device"
        end_class.setdefault(type_of[h], set()).add(class_of[next(iter(devs))])
    if any(len(v) > 1 for v in end_class.values()):
        return False, "hosts of one type reach the network through different devices"
    return True, ""
