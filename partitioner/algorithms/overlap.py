"""One step's time when the link streams weights while other groups compute.

The additive latency prices a streamed group as max(compute, its weights over the link), as
if nothing else ran while its copy did. A weight streamer does better: its copies depend on
no activation, so while a layer runs on the host CPU the link is already bringing in the
next streamed layer's weights (`runtime/weight_stream.py`: two slots, item k copied as soon
as the link is free and item k-2 has left its slot). A decode step that alternates streamed
layers with CPU layers keeps both resources busy, which the additive sum cannot see.

`schedule` replays one step as the runtime runs it: groups one after another in order (the
executor's order), each streamed or split group starting once its weights have arrived, each
copy starting once the link and a slot are free. Steady state: the copies of the next step's
first items overlap the end of this one (the streamer prefetches across steps), so the step
is replayed three times and the last one is measured.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from hetero.partitioner.algorithms.problem import Problem, Rows

_STEPS = 3  # replays: the first fills the pipeline, the last is the steady state
_SLOTS = 2  # the streamer's double buffer (problem.memory prices the same two)


@dataclass(frozen=True)
class Schedule:
    """The last replayed step: its length, and per group when it started (after its inputs
    arrived) and ended (seconds from the step's start)."""

    seconds: float
    start: np.ndarray
    end: np.ndarray

    def durations(self) -> np.ndarray:
        """[n] each group's own time, the wait for its weights included."""
        return self.end - self.start


def schedule(problem: Problem, assign: np.ndarray) -> Schedule:
    """Replay `assign` (a placement per group); needs `problem.copy_s` and `own_s`."""
    seconds, start, end = _replay(problem.rows, assign.tolist())
    return Schedule(seconds, np.array(start), np.array(end))


def _replay(r: Rows, assign: list[int]) -> tuple[float, list[float], list[float]]:
    """`schedule`'s step and per group its start and end, in Python floats: the local
    search replays thousands of steps of a few dozen groups, where numpy's cost per call
    outweighs the work. The sums are `caller_io`'s and `_incoming`'s, in their order."""
    n = len(assign)
    dev = [r.device[p] for p in assign]
    run = [0] * n
    for i in range(1, n):
        run[i] = run[i - 1] + (assign[i] != assign[i - 1])
    # the caller's latency once per run that reads (writes) its values: `caller_latency`
    caller = [0.0] * n
    for at, lat in ((r.reads, r.in_latency), (r.writes, r.out_latency)):
        last = -1
        for i in at:
            if run[i] != last:
                caller[i] += lat[dev[i]]
                last = run[i]
    own = [r.own[i][p] + (r.io[i][p] + caller[i]) for i, p in enumerate(assign)]
    copy = [r.copy[i][p] for i, p in enumerate(assign)]
    streamed = [r.streamed[p] and c > 0 for p, c in zip(assign, copy, strict=True)]
    incoming = [0.0] * n
    heads: dict[tuple[int, int], tuple[int, int]] = {}  # pair of runs -> (v, edge)
    for e, (u, v, nbytes) in enumerate(r.edges):
        a, b = dev[u], dev[v]
        if a != b:  # on one device the link's row is 0: adding it changes nothing
            incoming[v] += nbytes * r.inv_bw[a][b]
            head = heads.get((run[u], run[v]))
            if head is None or v < head[0]:
                heads[(run[u], run[v])] = (v, e)
    for e in sorted(e for _, e in heads.values()):
        u, v, _ = r.edges[e]
        incoming[v] += r.link_latency[dev[u]][dev[v]]
    # per device streaming there: how many items, when its link is free, and the ends of
    # the items run so far (all replays, in order)
    items = Counter(d for d, s in zip(dev, streamed, strict=True) if s)
    link_free = dict.fromkeys(items, 0.0)
    ends: dict[int, list[float]] = {d: [] for d in items}
    start, end = [0.0] * n, [0.0] * n
    t = step_start = 0.0
    for _ in range(_STEPS):
        step_start = t
        for i in range(n):
            s = t + incoming[i]
            if streamed[i]:
                d = dev[i]
                done = ends[d]
                if items[d] == 1:  # nothing to prefetch: copied when acquired
                    ready = s
                else:
                    # the copy waits for the item two before it to leave its slot
                    ready = done[-_SLOTS] if len(done) >= _SLOTS else 0.0
                copied = max(link_free[d], ready) + copy[i]
                link_free[d] = copied
                e_i = max(s, copied) + own[i]
                done.append(e_i)
            else:
                e_i = s + own[i]
            start[i], end[i] = s, e_i
            t = e_i
    return t - step_start, [x - step_start for x in start], [x - step_start for x in end]


def caller_io(problem: Problem, assign: np.ndarray) -> np.ndarray:
    """[n] seconds each group spends on the caller's values: their bytes, and the caller's
    latency once per run that reads (or writes) them."""
    idx = np.arange(problem.n)
    io_bytes = problem.base[idx, assign] - problem.compute[idx, assign]
    return io_bytes + problem.caller_latency(assign[None, :])[0]


def _incoming(problem: Problem, assign: np.ndarray, dev: np.ndarray) -> np.ndarray:
    """[n] seconds of transfers into each group: its edges' bytes over the link, and the
    link's latency (with the executor's hop and the call it starts) once per pair of stages
    (runs of one placement), on the first group of the receiving stage that reads from the
    sending one. The runtime sends one packet from a stage to each stage that reads from it:
    an edge per value (a layer reads the hidden state, the rotary table and the mask from
    the stage before it) priced three hops of ~1 ms where Ray makes one."""
    incoming = np.zeros(problem.n)
    if not len(problem.edges):
        return incoming
    u, v = problem.edges[:, 0], problem.edges[:, 1]
    a, b = dev[u], dev[v]
    np.add.at(incoming, v, problem.edge_bytes * problem.link_inv_bw[a, b])
    heads = problem.pair_heads(assign[None, :])[0]
    np.add.at(incoming, v[heads], problem.link_latency[a[heads], b[heads]])
    return incoming


def overlapped_latency(problem: Problem, assign: np.ndarray) -> float:
    r, a = problem.rows, assign.tolist()
    if not all(ok[p] for ok, p in zip(r.allowed, a, strict=True)):
        return float("inf")
    return _replay(r, a)[0]


def pattern_seeds(problem: Problem, assign: np.ndarray) -> list[np.ndarray]:
    """Assignments that interleave two placements along the weighted groups that could
    stream (those `assign` does not keep resident on a GPU, then all of them): one every
    k-th, for a few ratios. A local search from the additive optimum moves one group at a
    time and rarely finds an interleaving, whose gain appears only once many groups take
    part."""
    allowed = problem.allowed()
    can_stream = allowed[:, problem.place_streamed].any(axis=1) & (problem.param_bytes > 0)
    on_gpu = ~problem.place_streamed[assign] & np.isin(
        problem.place_device[assign], problem.place_device[problem.place_streamed]
    )
    seeds = []
    for movable in (np.flatnonzero(can_stream & ~on_gpu), np.flatnonzero(can_stream)):
        if len(movable) < 2:
            continue
        choices = [p for p in range(problem.num_placements) if allowed[movable, p].all()]
        for a in choices:
            for b in choices:
                if a == b:
                    continue
                for share in (0.25, 1 / 3, 0.5, 2 / 3, 0.75):
                    trial = assign.copy()
                    # Bresenham: b takes `share` of the groups, spread evenly along the order
                    for k, i in enumerate(movable):
                        trial[i] = b if int((k + 1) * share) - int(k * share) else a
                    seeds.append(trial)
    return seeds
