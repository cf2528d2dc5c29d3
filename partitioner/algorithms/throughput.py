"""Pipeline stages: contiguous runs of the topological order, one device each, chosen by
dynamic programming over (stage end, placement, devices used) to minimise the slowest
stage (compute + the values it receives), ties broken by the sum of stage times.

Exact for the pipeline model of `problem.py`: a stage's cost depends only on its own
groups, its placement and the previous stage's device (values live across its first
boundary are forwarded along the pipeline), and its memory only on its own groups.
"""

from __future__ import annotations

import numpy as np

from hetero.partitioner.algorithms.problem import INF, Problem, Solution


def throughput(problem: Problem) -> Solution:
    n, num_p = problem.n, problem.num_placements
    if n == 0:
        return Solution(np.zeros(0, dtype=int), 0.0, "throughput")
    seg = _segment_costs(problem)  # [n, n+1, P]: stage of groups start..stop-1 (inf: invalid)
    live = problem.live_bytes()
    dev = problem.place_device
    # state (stop, placement, used devices bitmask) -> ((max, sum), previous state, start)
    best: dict[tuple[int, int, int], tuple[tuple[float, float], tuple | None, int]] = {}
    for stop in range(1, n + 1):
        for p in range(num_p):
            c = seg[0, stop, p]
            if np.isfinite(c):
                _offer(best, (stop, p, 1 << dev[p]), (c, c), None, 0)
    for start in range(1, n):
        for (stop0, q, used), ((mx, sm), _, _) in list(best.items()):
            if stop0 != start:
                continue
            for p in range(num_p):
                d = int(dev[p])
                if used >> d & 1:
                    continue
                move = problem.transfer(live[start], int(dev[q]), d)
                for stop in range(start + 1, n + 1):
                    c = seg[start, stop, p]
                    if not np.isfinite(c):
                        continue
                    t = c + move
                    _offer(
                        best,
                        (stop, p, used | 1 << d),
                        (max(mx, t), sm + t),
                        (start, q, used),
                        start,
                    )
    finals = [(v[0], k) for k, v in best.items() if k[0] == n]
    if not finals:
        return Solution(np.zeros(n, dtype=int), INF, "throughput")
    (mx, _), state = min(finals)
    assign = np.zeros(n, dtype=int)
    while state is not None:
        stop, p, _ = state
        _, prev, start = best[state]
        assign[start:stop] = p
        state = prev
    return Solution(assign, problem.throughput(assign), "throughput")


def _offer(best, state, key, prev, start) -> None:
    old = best.get(state)
    if old is None or key < old[0]:
        best[state] = (key, prev, start)


def _segment_costs(problem: Problem) -> np.ndarray:
    """Compute (+ caller I/O) of every contiguous stage at every placement; inf where a group
    is not allowed there or the stage does not fit the device's memory."""
    n, num_p = problem.n, problem.num_placements
    out = np.full((n, n + 1, num_p), INF)
    base = problem.base
    reads, writes = problem.in_bytes > 0, problem.out_bytes > 0
    for p in range(num_p):
        d = problem.place_device[p]
        cap = problem.capacity[d]
        streamed = problem.place_streamed[p]
        for start in range(n):
            total, psum, pmax, amax = 0.0, 0.0, 0.0, 0.0
            read = wrote = False  # the caller's packet in (out) is paid once per stage
            for stop in range(start + 1, n + 1):
                i = stop - 1
                total += base[i, p]
                if reads[i] and not read:
                    total, read = total + problem.in_latency[d], True
                if writes[i] and not wrote:
                    total, wrote = total + problem.out_latency[d], True
                if not np.isfinite(total):
                    break
                psum += problem.param_bytes[i]
                pmax = max(pmax, problem.param_bytes[i])
                amax = max(amax, problem.act_bytes[i])
                need = (2 * pmax if streamed else psum) + amax
                if need > cap:
                    break  # a longer stage needs at least as much
                out[start, stop, p] = total
    return out
