"""The partitioning problem over device classes and host types (counts, not names).

`Tiers` is the `Problem` of `problem.py` seen through a cluster's symmetry (`symmetry.py`):
costs per *placement class* (a device class and a weight home) instead of per device, the
number of instances of each class on a host of each type, and transfer costs between two
instances by their relation only: on one host of type t, or on two hosts of types t, t2.
`from_problem` reads these off a Problem built over representatives only (the reduced
cluster); `expand` builds the Problem over any set of real devices from the same numbers,
so the plan is assembled, priced and checked on names without pricing all of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from hetero.partitioner.algorithms.problem import INF, Placement, Problem
from hetero.partitioner.algorithms.symmetry import Slot


@dataclass(frozen=True, eq=False)
class Tiers:
    # [T, n, K] seconds of group i at placement class k on a host of type t, the caller's
    # latencies aside (a stage pays those once: `in_lat`, `out_lat`)
    unary: np.ndarray
    place_class: np.ndarray  # [K] the device class of placement class k
    place_keys: tuple[Placement, ...]  # [K] the placement with its device left out (-1)
    streamed: np.ndarray  # [K] weights stream in from the host (double-buffered)
    capacity: np.ndarray  # [C] bytes of one instance of class c
    counts: np.ndarray  # [T, C] instances of class c on one host of type t
    hosts: np.ndarray  # [T] hosts of type t
    intra_lat: np.ndarray  # [T, C, C] seconds per transfer, two instances on one host (inf: none)
    intra_inv: np.ndarray  # [T, C, C] seconds per byte
    inter_lat: np.ndarray  # [T, T, C, C] two instances on two hosts of the given types
    inter_inv: np.ndarray  # [T, T, C, C]
    param_bytes: np.ndarray  # [n]
    act_bytes: np.ndarray  # [n]
    live: np.ndarray  # [n+1] bytes live across boundary s (forwarded along a pipeline)
    out_io: np.ndarray | None = None  # [T, n, K] the part of unary that returns outputs
    state_bytes: np.ndarray | None = None  # [n] buffers updated in place (stay where they run)
    # [T, K] the caller's latency into (out of) a stage at class k on a host of type t, paid
    # once by a stage with a group that reads its inputs (`reads`, [n]) or writes outputs
    in_lat: np.ndarray | None = None
    out_lat: np.ndarray | None = None
    reads: np.ndarray | None = None
    writes: np.ndarray | None = None

    @property
    def n(self) -> int:
        return self.unary.shape[1]

    @property
    def num_types(self) -> int:
        return self.unary.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.capacity)

    @property
    def num_placements(self) -> int:
        return len(self.place_class)

    def move(self, nbytes: np.ndarray, t: int, c: int, t2: int, c2: int, same_host: bool):
        """Seconds to forward `nbytes` (an array) from class c to class c2 (distinct instances)."""
        if same_host:
            lat, inv = self.intra_lat[t, c, c2], self.intra_inv[t, c, c2]
        else:
            lat, inv = self.inter_lat[t, t2, c, c2], self.inter_inv[t, t2, c, c2]
        with np.errstate(invalid="ignore"):  # 0 bytes over a missing relation: nothing moves
            return np.where(nbytes > 0, lat + nbytes * inv, 0.0)


def placement_key(pl: Placement) -> Placement:
    """A placement with its device left out: what placements of one class have in common."""
    return replace(pl, device=-1)


def from_problem(
    problem: Problem,
    slots: Sequence[Slot],
    counts: Sequence[Sequence[int]],
    hosts: Sequence[int],
) -> Tiers:
    """Read Tiers off `problem`, built over representatives whose slots are `slots` (one per
    device): (class c, type t, host 0, instance 0) of every present pair, plus instance 1
    where a class has two instances on a host and host 1 where a type has two hosts."""
    counts = np.asarray(counts, dtype=int)
    hosts = np.asarray(hosts, dtype=int)
    num_t, num_c = counts.shape
    at = {s: i for i, s in enumerate(slots)}
    keys: dict[tuple[int, Placement], int] = {}
    for pl in problem.placements:
        keys.setdefault((slots[pl.device].cls, placement_key(pl)), len(keys))
    k_n = len(keys)
    unary = np.full((num_t, problem.n, k_n), INF)
    out_io = np.zeros((num_t, problem.n, k_n))
    in_lat = np.zeros((num_t, k_n))
    out_lat = np.zeros((num_t, k_n))
    out = problem.out_bytes
    place_class = np.zeros(k_n, dtype=int)
    place_keys: list[Placement] = [Placement(-1)] * k_n
    streamed = np.zeros(k_n, dtype=bool)
    for p, pl in enumerate(problem.placements):
        s = slots[pl.device]
        k = keys[(s.cls, placement_key(pl))]
        place_class[k] = s.cls
        place_keys[k] = placement_key(pl)
        streamed[k] = problem.place_streamed[p]
        if s.host == 0 and s.instance == 0:
            unary[s.host_type, :, k] = problem.base[:, p]
            d = pl.device
            out_io[s.host_type, :, k] = out * problem.link_inv_bw[d, problem.origin]
            in_lat[s.host_type, k] = problem.in_latency[d]
            out_lat[s.host_type, k] = problem.out_latency[d]
    capacity = np.full(num_c, INF)
    for i, s in enumerate(slots):
        capacity[s.cls] = problem.capacity[i]
    intra_lat = np.full((num_t, num_c, num_c), INF)
    intra_inv = np.full((num_t, num_c, num_c), INF)
    inter_lat = np.full((num_t, num_t, num_c, num_c), INF)
    inter_inv = np.full((num_t, num_t, num_c, num_c), INF)
    for t in range(num_t):
        for c in range(num_c):
            a = at.get(Slot(c, t, 0, 0))
            if a is None:
                continue
            for c2 in range(num_c):
                b = at.get(Slot(c2, t, 0, 1 if c2 == c else 0))
                if b is not None:
                    intra_lat[t, c, c2] = problem.link_latency[a, b]
                    intra_inv[t, c, c2] = problem.link_inv_bw[a, b]
                for t2 in range(num_t):
                    b = at.get(Slot(c2, t2, 1 if t2 == t else 0, 0))
                    if b is not None:
                        inter_lat[t, t2, c, c2] = problem.link_latency[a, b]
                        inter_inv[t, t2, c, c2] = problem.link_inv_bw[a, b]
    return Tiers(
        unary=unary,
        place_class=place_class,
        place_keys=tuple(place_keys),
        streamed=streamed,
        capacity=capacity,
        counts=counts,
        hosts=hosts,
        intra_lat=intra_lat,
        intra_inv=intra_inv,
        inter_lat=inter_lat,
        inter_inv=inter_inv,
        param_bytes=problem.param_bytes,
        act_bytes=problem.act_bytes,
        live=problem.live_bytes(),
        out_io=out_io,
        state_bytes=problem.state_bytes,
        in_lat=in_lat,
        out_lat=out_lat,
        reads=problem.in_bytes > 0,
        writes=out > 0,
    )


def expand(
    problem: Problem,
    slots: Sequence[Slot],
    targets: Sequence[tuple[str, Slot]],
    origin: str,
) -> Problem:
    """The Problem over the real devices `targets` ((name, slot), the origin among them),
    built from `problem` over representatives (see `from_problem`): each device takes the
    columns of its class's representative on its host type, each pair the transfer costs of
    the representatives in the same relation."""
    at = {s: i for i, s in enumerate(slots)}
    names = [name for name, _ in targets]
    if origin not in names:
        raise ValueError(f"the origin {origin} must be one of the devices")
    placements: list[Placement] = []
    columns: list[int] = []
    for j, (_, s) in enumerate(targets):
        rep = at[Slot(s.cls, s.host_type, 0, 0)]
        for p, pl in enumerate(problem.placements):
            if pl.device == rep:
                placements.append(replace(pl, device=j))
                columns.append(p)
    d_n = len(targets)
    lat = np.zeros((d_n, d_n))
    inv = np.zeros((d_n, d_n))
    for i, (_, a) in enumerate(targets):
        src = at[Slot(a.cls, a.host_type, 0, 0)]
        for j, (_, b) in enumerate(targets):
            if i == j:
                continue
            if (a.host_type, a.host) == (b.host_type, b.host):
                dst = at[Slot(b.cls, b.host_type, 0, 1 if b.cls == a.cls else 0)]
            else:
                dst = at[Slot(b.cls, b.host_type, 1 if b.host_type == a.host_type else 0, 0)]
            lat[i, j] = problem.link_latency[src, dst]
            inv[i, j] = problem.link_inv_bw[src, dst]
    reps = [at[Slot(s.cls, s.host_type, 0, 0)] for _, s in targets]
    capacity = problem.capacity[reps]
    return Problem(
        names=problem.names,
        devices=tuple(names),
        placements=tuple(placements),
        compute=problem.compute[:, columns],
        edges=problem.edges,
        edge_bytes=problem.edge_bytes,
        link_latency=lat,
        link_inv_bw=inv,
        param_bytes=problem.param_bytes,
        act_bytes=problem.act_bytes,
        capacity=capacity,
        in_bytes=problem.in_bytes,
        out_bytes=problem.out_bytes,
        origin=names.index(origin),
        state_bytes=problem.state_bytes,
        split_bytes=problem.split_bytes,
        slot_floor=problem.slot_floor[reps],
        call=problem.call[reps],
        caller_hop=problem.caller_hop,
    )


def placement_index(problem: Problem) -> Mapping[tuple[int, Placement], int]:
    """(device index, placement key) -> placement index of `problem`."""
    return {(pl.device, placement_key(pl)): p for p, pl in enumerate(problem.placements)}
