"""Random partitioning problems with a cluster's symmetry: identical devices in classes,
identical hosts in types, costs between instances that depend only on their relation.
Built as a flat `Problem` (for brute force) together with each device's slot."""

from __future__ import annotations

import numpy as np

from hetero.partitioner.algorithms.problem import Placement, Problem
from hetero.partitioner.algorithms.symmetry import Slot, Symmetry

ORIGIN, GPU, CPU = 0, 1, 2  # classes: the caller's CPU, accelerators, other hosts' CPUs


def symmetric_problem(
    seed: int,
    n: int,
    *,
    gpus: int = 2,
    hosts: int = 0,
    other_gpus: int = 1,
    chain: bool = True,
    memory: bool = False,
):
    """(problem, slots, counts, hosts): an origin host (its CPU + `gpus` GPUs) and `hosts`
    more hosts of one type (a CPU + `other_gpus` GPUs each)."""
    rng = np.random.default_rng(seed)
    counts = [[1, gpus, 0]] + ([[0, other_gpus, 1]] if hosts else [])
    host_counts = [1] + ([hosts] if hosts else [])
    base = rng.uniform(0.1, 5, size=(n, 3))
    base[:, GPU] *= rng.uniform(0.1, 1.0)
    base[:, CPU] = base[:, ORIGIN] * rng.uniform(0.8, 1.2)
    params = rng.uniform(0, 10, size=n)
    off = rng.random(n) < 0.15  # ops the accelerators do not run
    stream_rate = rng.uniform(0.1, 0.5)
    intra_lat = rng.uniform(0, 0.2, (3, 3))
    intra_lat = (intra_lat + intra_lat.T) / 2
    intra_inv = rng.uniform(0.2, 1, (3, 3))
    intra_inv = (intra_inv + intra_inv.T) / 2
    inter_lat = intra_lat + rng.uniform(0, 0.3)
    inter_inv = intra_inv + rng.uniform(0, 1)
    cap = np.array([1e9, 1e9, 1e9])
    if memory:
        cap[GPU] = rng.uniform(10, params.sum() + 10)

    devices: list[str] = []
    slots: list[Slot] = []
    host_of: list[tuple[int, int]] = []
    for t, (cnt, hn) in enumerate(zip(counts, host_counts, strict=True)):
        for h in range(hn):
            for c in range(3):
                for i in range(cnt[c]):
                    devices.append(f"t{t}h{h}/c{c}i{i}")
                    slots.append(Slot(c, t, h, i))
                    host_of.append((t, h))
    placements: list[Placement] = []
    columns = []
    for d, s in enumerate(slots):
        col = base[:, s.cls].copy()
        if s.cls == GPU:
            col[off] = np.inf
        placements.append(Placement(d))
        columns.append(col)
        if s.cls == GPU:
            placements.append(Placement(d, "streamed"))
            columns.append(np.where(off, np.inf, np.maximum(col, params * stream_rate)))
    d_n = len(devices)
    lat = np.zeros((d_n, d_n))
    inv = np.zeros((d_n, d_n))
    for a in range(d_n):
        for b in range(d_n):
            if a == b:
                continue
            ca, cb = slots[a].cls, slots[b].cls
            same = host_of[a] == host_of[b]
            lat[a, b] = (intra_lat if same else inter_lat)[ca, cb]
            inv[a, b] = (intra_inv if same else inter_inv)[ca, cb]
    edges = []
    for v in range(1, n):
        if chain or rng.random() < 0.7:
            edges.append((v - 1, v))
        if not chain:
            edges += [(u, v) for u in range(v - 1) if rng.random() < 0.15]
    problem = Problem(
        names=tuple(f"g{i}" for i in range(n)),
        devices=tuple(devices),
        placements=tuple(placements),
        compute=np.stack(columns, axis=1),
        edges=np.array(edges, dtype=int).reshape(-1, 2),
        edge_bytes=rng.uniform(0, 3, size=len(edges)),
        link_latency=lat,
        link_inv_bw=inv,
        param_bytes=params,
        act_bytes=rng.uniform(0, 1, n),
        capacity=np.array([cap[s.cls] for s in slots]),
        in_bytes=np.r_[1.0, np.zeros(n - 1)],
        out_bytes=np.r_[np.zeros(n - 1), 1.0],
        origin=0,
    )
    return problem, slots, counts, host_counts


def layout(problem: Problem, slots, counts, hosts):
    """The Symmetry the planner would find for a problem built by `symmetric_problem`."""
    names = problem.devices
    num_c = len(counts[0])
    classes = tuple(
        tuple(n for n, s in zip(names, slots, strict=True) if s.cls == c) for c in range(num_c)
    )
    return Symmetry(
        cluster=None,
        origin=names[problem.origin],
        classes=classes,
        class_kind=tuple("gpu" if c == GPU else "cpu" for c in range(num_c)),
        host_types=tuple(tuple(f"t{t}h{h}" for h in range(hn)) for t, hn in enumerate(hosts)),
        counts=tuple(tuple(c) for c in counts),
        slots=dict(zip(names, slots, strict=True)),
        names=dict(zip(slots, names, strict=True)),
        regular=True,
    )


def flat_layout(problem: Problem):
    """Every device a class of its own on one host: no symmetry at all."""
    d_n = problem.num_devices
    slots = [Slot(d, 0, 0, 0) for d in range(d_n)]
    counts = [[1] * d_n]
    return slots, counts, [1]
