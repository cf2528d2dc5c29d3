"""Brute force over every assignment: the ground truth the other algorithms are tested against."""

from __future__ import annotations

import numpy as np

from hetero.errors import ConfigError
from hetero.partitioner.algorithms.problem import INF, Problem, Solution

MAX_ASSIGNMENTS = 4_000_000
_CHUNK = 200_000


def exhaustive(problem: Problem) -> Solution:
    """The fastest assignment for one request (the latency objective)."""
    choices = [np.flatnonzero(row) for row in problem.allowed()]
    sizes = np.array([len(c) for c in choices])
    if (sizes == 0).any():
        return Solution(np.zeros(problem.n, dtype=int), INF, "exhaustive")
    total = int(np.prod(sizes.astype(float)))
    if total > MAX_ASSIGNMENTS:
        raise ConfigError(
            f"exhaustive search would try {total:,} assignments (limit {MAX_ASSIGNMENTS:,}); "
            "use algorithm 'latency' or coarsen the graph further"
        )
    best, best_cost = None, INF
    strides = np.cumprod(np.r_[1, sizes[:-1]])
    for lo in range(0, total, _CHUNK):
        idx = np.arange(lo, min(total, lo + _CHUNK))
        digits = (idx[:, None] // strides[None, :]) % sizes[None, :]
        assign = np.stack([choices[i][digits[:, i]] for i in range(problem.n)], axis=1)
        cost = problem.latencies(assign)
        dev = problem.place_device[assign]
        cost = np.where(_fits(problem, assign, dev), cost, INF)
        k = int(np.argmin(cost))
        if cost[k] < best_cost:
            best_cost, best = float(cost[k]), assign[k].copy()
    if best is None:
        return Solution(np.zeros(problem.n, dtype=int), INF, "exhaustive")
    return Solution(best, best_cost, "exhaustive")


def _fits(problem: Problem, assign: np.ndarray, dev: np.ndarray) -> np.ndarray:
    ok = np.ones(len(assign), dtype=bool)
    streamed = problem.place_streamed[assign]
    params = problem.param_bytes[None, :]
    for d in range(problem.num_devices):
        on = dev == d
        res = (on & ~streamed) * params
        st = (on & streamed) * params
        need = res.sum(axis=1) + 2 * st.max(axis=1) + (on * problem.act_bytes[None, :]).max(axis=1)
        ok &= need <= problem.capacity[d]
    return ok


def exhaustive_pipelines(problem: Problem) -> Solution:
    """The pipeline with the fastest slowest stage (the throughput objective): every split of the order into stages, each on its own device, every placement."""
    allowed = problem.allowed()
    live = problem.live_bytes()
    best: tuple[float, float] = (INF, INF)
    best_assign = None
    assign = np.zeros(problem.n, dtype=int)

    def rec(start: int, used: frozenset[int]) -> None:
        nonlocal best, best_assign
        if start == problem.n:
            if not problem.feasible(assign):
                return
            times = problem.stage_times(assign, live)
            key = (max(times), sum(times))
            if key < best:
                best, best_assign = key, assign.copy()
            return
        for stop in range(start + 1, problem.n + 1):
            for p in range(problem.num_placements):
                d = int(problem.place_device[p])
                if d in used or not allowed[start:stop, p].all():
                    continue
                assign[start:stop] = p
                rec(stop, used | {d})

    rec(0, frozenset())
    if best_assign is None:
        return Solution(np.zeros(problem.n, dtype=int), INF, "exhaustive")
    return Solution(best_assign, best[0], "exhaustive")
