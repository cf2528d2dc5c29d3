"""Exact latency by branch and bound, with identical devices tried once, until a deadline.

Groups are placed in topological order. A partial assignment costs its groups' base terms,
the bytes of edges whose ends are both placed and, once per pair of partitions (runs of one
placement, which placing in order closes one after another), the link's latency, and the
caller's once per partition that reads or writes its values; every unplaced group adds at
least its cheapest allowed base term, which bounds the subtree. Memory only grows as groups are
added, so a device that overflows ends a branch. Devices that swapping leaves every cost
array unchanged (`interchangeable`) form a class; a group may go to a device of a class
already in use, or to the first unused one (any other choice is a relabelling of one tried).

Returns the best assignment found and whether the search finished (the result is optimal
for `Problem.latency` under its memory limits) or ran out of time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from hetero.partitioner.algorithms.problem import INF, Problem

_CHECK_EVERY = 512  # nodes between looks at the clock


@dataclass(frozen=True)
class BranchResult:
    assign: np.ndarray | None
    value: float
    proven: bool  # the search space was exhausted (optimal) rather than cut by the deadline
    nodes: int


def interchangeable(problem: Problem) -> list[list[int]]:
    """Classes of devices whose swap maps every cost array of `problem` onto itself."""
    d_n = problem.num_devices
    by_dev: list[list[int]] = [[] for _ in range(d_n)]
    for p, pl in enumerate(problem.placements):
        by_dev[pl.device].append(p)

    def swappable(a: int, b: int) -> bool:
        if a == problem.origin or b == problem.origin:
            return False
        pa, pb = by_dev[a], by_dev[b]
        if len(pa) != len(pb) or problem.capacity[a] != problem.capacity[b]:
            return False
        if problem.slot_floor[a] != problem.slot_floor[b]:
            return False
        for x, y in zip(pa, pb, strict=True):
            if problem.placements[x].weights != problem.placements[y].weights:
                return False
            if not np.array_equal(problem.compute[:, x], problem.compute[:, y]):
                return False
        perm = np.arange(d_n)
        perm[a], perm[b] = b, a
        for m in (problem.link_latency, problem.link_inv_bw):
            if not np.array_equal(m, m[np.ix_(perm, perm)]):
                return False
        return True

    classes: list[list[int]] = []
    for d in range(d_n):
        for cls in classes:
            if all(swappable(d, e) for e in cls):
                cls.append(d)
                break
        else:
            classes.append([d])
    return classes


def branch_and_bound(
    problem: Problem,
    *,
    incumbent: np.ndarray | None = None,
    deadline: float = INF,
    classes: list[list[int]] | None = None,
) -> BranchResult:
    n = problem.n
    if n == 0:
        return BranchResult(np.zeros(0, dtype=int), 0.0, True, 0)
    allowed = problem.allowed()
    base = problem.base
    dev_of = problem.place_device
    streamed = problem.place_streamed
    classes = classes if classes is not None else interchangeable(problem)
    class_of = np.zeros(problem.num_devices, dtype=int)
    rank = np.zeros(problem.num_devices, dtype=int)  # position inside its class
    for c, members in enumerate(classes):
        for r, d in enumerate(sorted(members)):
            class_of[d], rank[d] = c, r
    cheapest = np.where(allowed, base, INF).min(axis=1)
    rest = np.r_[np.cumsum(cheapest[::-1])[::-1], 0.0]  # rest[i]: lower bound for i..n-1
    preds: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # (edge, source group)
    for e, (u, v) in enumerate(problem.edges):
        preds[int(v)].append((e, int(u)))
    options = [np.flatnonzero(allowed[i]) for i in range(n)]

    best_value = INF
    best: np.ndarray | None = None
    if incumbent is not None and problem.feasible(incumbent):
        best, best_value = incumbent.copy(), problem.latency(incumbent)
    assign = np.full(n, -1, dtype=int)
    run = np.zeros(n, dtype=int)  # the run of one placement each placed group is in
    resident = np.zeros(problem.num_devices)
    stream_max = np.zeros(problem.num_devices)
    act_max = np.zeros(problem.num_devices)
    used_in_class = np.zeros(len(classes), dtype=int)  # how many of each class are in use
    count_on = np.zeros(problem.num_devices, dtype=int)  # groups on each device
    nodes = 0
    timed_out = False
    eps = 1e-12

    def fits(d: int, i: int, p: int) -> tuple[float, float, float] | None:
        # Problem.memory, built up one group at a time (a KV cache stays where it runs)
        res, st, act = resident[d], stream_max[d], act_max[d]
        if streamed[p]:
            item = problem.split_bytes[i] if problem.place_split[p] else problem.param_bytes[i]
            st = max(st, item)
            if problem.param_bytes[i] > 0:
                st = max(st, problem.slot_floor[d] / 2)
        else:
            res = res + problem.param_bytes[i]
        res = res + problem.state_bytes[i]
        act = max(act, problem.act_bytes[i])
        return (res, st, act) if res + 2 * st + act <= problem.capacity[d] else None

    def step(i: int, p: int, d: int, paid: frozenset[int], read: bool, wrote: bool):
        """What placing group i at p adds, and the state of the run it then ends: the
        sending runs it has paid a pair's latency for, whether it read (wrote) the caller's
        values."""
        if i and assign[i - 1] != p:  # a new run: nothing paid yet
            paid, read, wrote, r = frozenset(), False, False, run[i - 1] + 1
        else:
            r = run[i - 1] if i else 0
        inc = base[i, p]
        for e, u in preds[i]:
            du = dev_of[assign[u]]
            if du != d:
                inc += problem.edge_bytes[e] * problem.link_inv_bw[du, d]
                if run[u] not in paid:
                    inc += problem.link_latency[du, d]
                    paid = paid | {int(run[u])}
        if problem.in_bytes[i] > 0 and not read:
            inc, read = inc + problem.in_latency[d], True
        if problem.out_bytes[i] > 0 and not wrote:
            inc, wrote = inc + problem.out_latency[d], True
        return inc, (int(r), paid, read, wrote)

    def visit(i: int, cost: float, paid: frozenset[int], read: bool, wrote: bool) -> None:
        nonlocal best, best_value, nodes, timed_out
        if i == n:
            if cost < best_value - eps:
                best_value, best = cost, assign.copy()
            return
        nodes += 1
        if nodes % _CHECK_EVERY == 0 and time.perf_counter() > deadline:
            timed_out = True
        if timed_out:
            return
        trials = []
        for p in options[i]:
            d = int(dev_of[p])
            c = class_of[d]
            if count_on[d] == 0 and rank[d] != used_in_class[c]:
                continue  # an unused device that is not its class's next: a relabelling
            inc, after = step(i, int(p), d, paid, read, wrote)
            if cost + inc + rest[i + 1] >= best_value - eps:
                continue
            trials.append((inc, int(p), d, after))
        trials.sort(key=lambda x: x[:3])
        for inc, p, d, (r, paid_after, read_after, wrote_after) in trials:
            if cost + inc + rest[i + 1] >= best_value - eps or timed_out:
                break
            new = fits(d, i, p)
            if new is None:
                continue
            saved = resident[d], stream_max[d], act_max[d]
            resident[d], stream_max[d], act_max[d] = new
            c = class_of[d]
            opened = count_on[d] == 0
            count_on[d] += 1
            if opened:
                used_in_class[c] += 1
            assign[i], run[i] = p, r
            visit(i + 1, cost + inc, paid_after, read_after, wrote_after)
            assign[i] = -1
            if opened:
                used_in_class[c] -= 1
            count_on[d] -= 1
            resident[d], stream_max[d], act_max[d] = saved

    visit(0, 0.0, frozenset(), False, False)
    return BranchResult(best, best_value, not timed_out, nodes)
