"""Minimise one request's time: exact min-cut for two devices, list scheduling plus
expansion moves for more, memory by Lagrangian penalties, then local refinement.

Placements on one device differ only in where weights live, so the cut works on devices:
each group's cost on a device is its cheapest placement there, with resident parameters
charged `lam[d]` per byte while device d overflows. The quotient of any assignment is made
acyclic later by cutting it into more partitions (see `assemble.form_partitions`), so no
acyclicity constraint weakens the cut.

The cut prices each value crossing devices as a packet of its own (`Problem.edge_cost`);
the runtime sends one packet per pair of partitions, so `Problem.latency` pays a link's
latency (and the executor's hop) once per pair, and the caller's once per partition. The
two are equal where every pair of partitions exchanges one value and every partition
reads (writes) at most one of the caller's (a chain of groups), and there, without binding
memory, the two-device cut is optimal. Elsewhere (a block's hidden state and residual
crossing together) the cut minimises an upper bound: the result costs at most the fewest
seconds any assignment costs priced per value, which the cuts re-priced with each pair's
latency shared among its values, and the local search under `Problem.latency`, improve on.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import networkx as nx
import numpy as np

from hetero.partitioner.algorithms.overlap import pattern_seeds
from hetero.partitioner.algorithms.problem import INF, Problem, Solution, run_index

_ROUNDS = 24  # Lagrangian updates before falling back to repair by local search
_BLOCK = 4  # longest run of consecutive groups the local search moves at once
_SWEEP = 16  # penalties sampled around the one that first fits
_STARTS = 3  # candidates the local search starts from
_SWAP_LIMIT = 24  # groups up to which the local search also tries two-group trades
_SMALL = 12  # up to this many groups, trades are tried even when memory does not bind
# Groups up to which a search that no move or two-group trade improves also tries changing
# three groups' placements at once: under memory limits the best assignment can lie three
# changes from a local optimum of the smaller steps (4 groups on 2 devices: [1,0,1,0] at
# 12.11 s against [0,1,0,0] at 10.89, every assignment between them over a device's memory;
# tests/partitioner/test_algorithms.py, seed 4937). C(8,3) * 27 trials at most per pass.
_TRIPLE_LIMIT = 8
# Perturbed restarts of the local search on small problems whose memory binds: there the
# best can lie five or six changes from a local optimum of every step above (3 devices,
# tests/partitioner/test_algorithms.py: seed 1382953814, 7 groups, 7.5% over the optimum;
# seed 962122045, 9 groups, 5.2%), beyond any fixed neighbourhood. 32 restarts close every
# gap over 1% in a sweep of 4,000 of its random problems; 16 leave one at 5.7%.
_KICKS = 32
_RESHARE = 3  # cuts re-priced with each pair's latency shared among the values it carries
# relative margin under which a lower bound refuses a trial: far above the bound's rounding
# (a few ulps per group), far below any difference the search acts on (1e-12 s)
_BOUND_MARGIN = 1e-9


def _lagrangian(problem: Problem) -> list[np.ndarray]:
    """Cuts under growing memory penalties until the devices fit, then a bisection back
    toward the smallest penalty that still fits (the first one that fits overshoots)."""
    candidates: list[np.ndarray] = []
    scale = _penalty_scale(problem)

    def solve(lam: np.ndarray, edge_cost: np.ndarray | None = None) -> np.ndarray:
        u, mode = _collapse(problem, lam)
        cost = problem.edge_cost if edge_cost is None else edge_cost
        assign = mode[np.arange(problem.n), _solve_devices(problem, u, cost)]
        candidates.append(assign)
        return assign

    def reshare(lam: np.ndarray) -> None:
        """Cuts where the values crossing between two partitions of the last cut share
        their pair's latency: a split that sends several values at once pays one hop."""
        assign = candidates[-1]
        for _ in range(_RESHARE if len(problem.edges) else 0):
            shared = _shared_edge_cost(problem, assign)
            if shared is None:  # no pair carries two values: the same cut again
                break
            new = solve(lam, shared)
            if np.array_equal(new, assign):
                break
            assign = new

    def every_pair(lam: np.ndarray) -> None:
        """Each pair of devices' own cut, which `solve` passes over for the labelling of least
        energy. The energy counts streamed weights as free, yet their slots take memory: where
        those overflow, the least energy stays over a device's memory at any penalty, while
        the pair that leaves it out fits, a few block moves from the best."""
        u, mode = _collapse(problem, lam)
        usable = [k for k in range(problem.num_devices) if np.isfinite(u[:, k]).any()]
        for a, b in itertools.combinations(usable if len(usable) > 2 else (), 2):
            labels = _pair_cut(problem, u, a, b, problem.edge_cost)
            candidates.append(mode[np.arange(problem.n), labels])

    lam = np.zeros(problem.num_devices)
    low = lam.copy()
    for _ in range(_ROUNDS):
        over = problem.overflow(solve(lam))
        if not over.any():
            break
        low = lam.copy()
        lam = np.where(over > 0, np.maximum(lam * 2.0, scale), lam)
    else:
        every_pair(lam)
        return candidates
    reshare(lam)
    high = lam
    for _ in range(6 if high.any() else 0):
        mid = (low + high) / 2
        if problem.overflow(solve(mid)).any():
            low = mid
        else:
            high = mid
    if high.any():  # the dual is not tight for a knapsack: sample penalties around it too
        binding = high > 0
        for f in np.logspace(-2, 2, _SWEEP):
            solve(np.where(binding, high * f, 0.0))
    return candidates


def latency(problem: Problem) -> Solution:
    if problem.n == 0:
        return Solution(np.zeros(0, dtype=int), 0.0, "latency")
    allowed = problem.allowed()
    prices = Prices(problem)
    candidates = _lagrangian(problem)
    candidates.append(_greedy(problem))
    if problem.overlapped:
        # the cuts and the greedy price additively; interleavings only pay when replayed
        fastest = min(candidates, key=prices.key)
        candidates.extend(pattern_seeds(problem, fastest))
    unique = list({tuple(a): a for a in candidates}.values())
    # the best that fit, and the fastest that overflow: repairing a fast assignment often
    # beats polishing a feasible one that the penalties pushed too far
    by_key = sorted(unique, key=prices.key)[:_STARTS]
    by_time = sorted(unique, key=prices.latency)[:_STARTS]
    candidates = list({tuple(a): a for a in by_key + by_time}.values())
    # trading two groups' placements pays mostly when memory binds (a knapsack step)
    binds = any(prices.overflow(a) > 0 for a in candidates)
    tight = binds or problem.n <= _SMALL
    best = None
    for start in candidates:
        refined = _local_search(problem, start, allowed, trades=tight, prices=prices)
        if best is None or prices.key(refined) < prices.key(best):
            best = refined
    if binds and problem.n <= _SMALL:
        best = _kicked(problem, best, allowed, prices)
    return Solution(best, prices.latency(best), "latency")


def _kicked(problem: Problem, best: np.ndarray, allowed: np.ndarray, prices: Prices) -> np.ndarray:
    """Iterated local search: `_KICKS` times, change two to four random groups of the best
    assignment to random allowed placements, search again from there, and keep what beats
    the best. A generator seeded here makes the plan a function of the problem alone."""
    rng = np.random.default_rng(0)
    choices = [np.flatnonzero(row) for row in allowed]
    for _ in range(_KICKS):
        trial = best.copy()
        size = min(problem.n, int(rng.integers(2, 5)))
        for g in rng.choice(problem.n, size=size, replace=False):
            trial[g] = rng.choice(choices[g])
        refined = _local_search(problem, trial, allowed, trades=True, prices=prices)
        if prices.key(refined) < prices.key(best):
            best = refined
    return best


class Prices:
    """One problem's assignments priced as the local search asks: feasibility first (bytes
    over capacity, summed), then time. Each assignment is priced once; a trial that
    overflows more than the best is refused before its time, and one whose lower bound
    (`Rows.least`) already reaches the best's time before its step is replayed: the search
    moves exactly as when it priced everything, at a fraction of the replays. It also keeps
    where each local search led (`searched`): the search is a function of where a pass
    starts, so a later start that reaches one goes on no further."""

    def __init__(self, problem: Problem) -> None:
        self.problem = problem
        self._least = problem.rows.least
        self._over: dict[bytes, float] = {}
        self._time: dict[bytes, float] = {}
        self.searched: dict[tuple[bool, bytes], np.ndarray] = {}

    def overflow(self, assign: np.ndarray) -> float:
        return _once(self._over, assign, self.problem.excess)

    def latency(self, assign: np.ndarray) -> float:
        return _once(self._time, assign, self.problem.latency)

    def key(self, assign: np.ndarray) -> tuple[float, float]:
        return self.overflow(assign), self.latency(assign)

    def improves(self, trial: np.ndarray, best: tuple[float, float]) -> tuple[float, float] | None:
        """`trial`'s key where it beats `best` (less overflow, or as much and faster by more
        than 1e-12 s), else None."""
        k = trial.tobytes()
        # where the best fits, no trial overflows less: one that cannot be faster loses
        # before its memory is counted
        if best[0] <= 0 and k not in self._over and self._slower(trial, k, best[1]):
            return None
        over = self.overflow(trial)
        if over > best[0] or (over == best[0] and self._slower(trial, k, best[1])):
            return None
        key = over, self.latency(trial)
        if key[0] < best[0] or (key[0] == best[0] and key[1] < best[1] - 1e-12):
            return key
        return None

    def _slower(self, trial: np.ndarray, k: bytes, seconds: float) -> bool:
        """Whether `trial` is no faster than `seconds` (by 1e-12 s): by its time where known,
        else by its lower bound."""
        known = self._time.get(k)
        if known is not None:
            return not known < seconds - 1e-12
        least = sum(row[p] for row, p in zip(self._least, trial.tolist(), strict=True))
        return least * (1 - _BOUND_MARGIN) >= seconds - 1e-12


def _once(known: dict[bytes, float], assign: np.ndarray, price) -> float:
    k = assign.tobytes()
    got = known.get(k)
    if got is None:
        got = known[k] = price(assign)
    return got


def _penalty_scale(problem: Problem) -> float:
    """Seconds per byte of resident parameters that makes memory matter next to time."""
    finite = problem.unary[np.isfinite(problem.unary)]
    spread = float(finite.max() - finite.min()) if finite.size else 1.0
    return max(spread, 1e-9) / max(float(problem.param_bytes.max()), 1.0) * 0.25


def _collapse(problem: Problem, lam: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[n, D] cheapest cost per device and [n, D] the placement that gives it."""
    n, d = problem.n, problem.num_devices
    u = np.full((n, d), INF)
    mode = np.zeros((n, d), dtype=int)
    for p, pl in enumerate(problem.placements):
        cost = problem.unary[:, p].copy()
        if not problem.place_streamed[p]:
            cost = cost + lam[pl.device] * problem.param_bytes
        better = cost < u[:, pl.device]
        u[better, pl.device] = cost[better]
        mode[better, pl.device] = p
    return u, mode


def _shared_edge_cost(problem: Problem, assign: np.ndarray) -> np.ndarray | None:
    """[E, D, D] `problem.edge_cost` with the latency of each edge crossing devices under
    `assign` divided among the edges between the same two runs (one packet for them all);
    None where no two edges share one."""
    u, v = problem.edges[:, 0], problem.edges[:, 1]
    dev = problem.place_device[assign]
    run = run_index(assign[None, :])[0]
    pair = np.where(dev[u] != dev[v], run[u] * (problem.n + 1) + run[v], -1)
    _, where, count = np.unique(pair, return_inverse=True, return_counts=True)
    share = np.where(pair >= 0, count[where], 1)
    if (share == 1).all():
        return None
    lat = problem.edge_cost - problem.edge_bytes[:, None, None] * problem.link_inv_bw
    return problem.edge_cost - lat * (1 - 1 / share)[:, None, None]


def _energy(problem: Problem, u: np.ndarray, labels: np.ndarray, edge_cost: np.ndarray) -> float:
    t = u[np.arange(problem.n), labels].sum()
    if len(problem.edges):
        e = np.arange(len(problem.edges))
        t += edge_cost[e, labels[problem.edges[:, 0]], labels[problem.edges[:, 1]]].sum()
    return float(t)


def _solve_devices(problem: Problem, u: np.ndarray, edge_cost: np.ndarray) -> np.ndarray:
    """Device per group minimising unary + transfers priced by `edge_cost` [E, D, D] (exact
    for two devices)."""
    d = problem.num_devices
    usable = [k for k in range(d) if np.isfinite(u[:, k]).any()]
    if len(usable) == 1:
        return np.full(problem.n, usable[0], dtype=int)
    starts = [_pair_cut(problem, u, a, b, edge_cost) for a, b in itertools.combinations(usable, 2)]
    if len(usable) > 2:  # expansion moves from every pair's cut: they reach different optima
        starts = [_expansion(problem, u, lab, usable, edge_cost) for lab in starts]
    return min(starts, key=lambda lab: _energy(problem, u, lab, edge_cost))


def _pair_cut(problem: Problem, u: np.ndarray, a: int, b: int, edge_cost: np.ndarray) -> np.ndarray:
    """Best assignment of every group to device a or b (x=1 means b)."""
    pairs = [
        (int(s), int(t), 0.0, edge_cost[e, a, b], edge_cost[e, b, a], 0.0)
        for e, (s, t) in enumerate(problem.edges)
    ]
    x = _binary_cut(u[:, a], u[:, b], pairs)
    return np.where(x, b, a)


def _expansion(
    problem: Problem, u: np.ndarray, labels: np.ndarray, usable, edge_cost: np.ndarray
) -> np.ndarray:
    """Alpha-expansion moves (each an exact binary cut) until none improves."""
    best = _energy(problem, u, labels, edge_cost)
    improved = True
    while improved:
        improved = False
        for alpha in usable:
            pairs = []
            for e, (s, t) in enumerate(problem.edges):
                ls, lt = labels[s], labels[t]
                c = edge_cost[e]
                pairs.append((int(s), int(t), c[ls, lt], c[ls, alpha], c[alpha, lt], 0.0))
            x = _binary_cut(u[np.arange(problem.n), labels], u[:, alpha], pairs)
            new = np.where(x, alpha, labels)
            energy = _energy(problem, u, new, edge_cost)
            if energy < best - 1e-15:
                best, labels, improved = energy, new, True
    return labels


def _binary_cut(u0: np.ndarray, u1: np.ndarray, pairs) -> np.ndarray:
    """Minimise sum_i u(x_i) + sum pair(x_s, x_t) over x in {0,1}^n by one s-t min cut.

    pairs: (s, t, A, B, C, D) = cost of (x_s, x_t) at (0,0), (0,1), (1,0), (1,1). A pair
    with B + C < A + D is not submodular; its coupling is dropped (callers re-check).
    """
    n = len(u0)
    u0 = np.array(u0, dtype=float)
    u1 = np.array(u1, dtype=float)
    g = nx.DiGraph()
    g.add_nodes_from(range(n))
    coupling: dict[tuple[int, int], float] = {}
    for s, t, a, b, c, d in pairs:
        u1[s] += c - a
        u1[t] += d - c
        w = b + c - a - d
        if w > 0:
            coupling[(s, t)] = coupling.get((s, t), 0.0) + w
    finite = np.concatenate([u0[np.isfinite(u0)], u1[np.isfinite(u1)]])
    big = 1e3 * (float(np.abs(finite).sum()) + sum(coupling.values()) + 1.0)
    u0 = np.where(np.isfinite(u0), u0, big)
    u1 = np.where(np.isfinite(u1), u1, big)
    low = np.minimum(u0, u1)
    u0, u1 = u0 - low, u1 - low
    for i in range(n):
        if u1[i] > 0:
            g.add_edge("s", i, capacity=float(u1[i]))
        if u0[i] > 0:
            g.add_edge(i, "t", capacity=float(u0[i]))
    for (s, t), w in coupling.items():
        g.add_edge(s, t, capacity=w)
    g.add_nodes_from(("s", "t"))
    _, (source_side, _) = nx.minimum_cut(g, "s", "t")
    return np.array([i not in source_side for i in range(n)], dtype=bool)


def _greedy(problem: Problem) -> np.ndarray:
    """List scheduling in topological order: each group to the placement that finishes it
    soonest given its placed predecessors, among those its device still has room for."""
    n = problem.n
    assign = np.full(n, -1, dtype=int)
    preds: list[list[int]] = [[] for _ in range(n)]
    for e, (_, t) in enumerate(problem.edges):
        preds[t].append(e)
    allowed = problem.allowed()
    for i in range(n):
        best, best_key = -1, (INF, INF)
        for p in np.flatnonzero(allowed[i]):
            d = problem.place_device[p]
            t = problem.unary[i, p] + sum(
                problem.edge_cost[e, problem.place_device[assign[problem.edges[e, 0]]], d]
                for e in preds[i]
            )
            trial = assign.copy()
            trial[i] = p
            over = problem.excess(trial)
            if (over, t) < best_key:
                best, best_key = int(p), (over, t)
        assign[i] = best if best >= 0 else 0
    return assign


def _local_search(
    problem: Problem,
    assign: np.ndarray,
    allowed: np.ndarray,
    *,
    trades: bool,
    prices: Prices | None = None,
) -> np.ndarray:
    """Move runs of up to _BLOCK consecutive groups to another placement, or trade the
    placements of two groups (a knapsack step when memory binds), while it helps.
    `prices`: the caller's, shared by its searches of `problem`."""
    prices = Prices(problem) if prices is None else prices
    assign = assign.copy()
    best = prices.key(assign)
    resident_of = _resident_of(problem)

    def better(trial: np.ndarray) -> bool:
        nonlocal assign, best
        key = prices.improves(trial, best)
        if key is None:
            return False
        assign, best = trial, key
        return True

    passes = []
    improved = True
    while improved:
        led = prices.searched.get((trades, assign.tobytes()))
        if led is not None:  # an earlier search passed here: it ends where that one did
            assign = led.copy()
            break
        passes.append(assign.tobytes())
        improved = False
        for length in range(1, _BLOCK + 1):
            for start in range(problem.n - length + 1):
                stop = start + length
                for p in range(problem.num_placements):
                    if (assign[start:stop] == p).all() or not allowed[start:stop, p].all():
                        continue
                    trial = assign.copy()
                    trial[start:stop] = p
                    improved |= better(trial)
        if resident_of:
            # Moving a group off a device whose memory binds pays only once the bytes it
            # frees let streamed groups there stay resident (an embedding table to the
            # CPU, a decoder layer resident): move, then refill, as one step.
            for i in range(problem.n):
                for p in np.flatnonzero(allowed[i]):
                    if p != assign[i]:
                        trial = assign.copy()
                        trial[i] = p
                        improved |= better(_refill(problem, trial, allowed, resident_of, prices))
        if improved or not trades or problem.n > _SWAP_LIMIT:
            continue
        for i, j in itertools.combinations(range(problem.n), 2):
            for p in np.flatnonzero(allowed[i]):
                for q in np.flatnonzero(allowed[j]):
                    if p == assign[i] or q == assign[j]:
                        continue
                    trial = assign.copy()
                    trial[i], trial[j] = p, q
                    if better(trial):
                        improved = True
                        break
        if not improved and problem.n <= _TRIPLE_LIMIT:
            improved = _three_changes(assign, allowed, better)
    for start in passes:
        prices.searched[(trades, start)] = assign
    return assign


def _three_changes(
    assign: np.ndarray, allowed: np.ndarray, better: Callable[[np.ndarray], bool]
) -> bool:
    """Tries every change of three groups' placements at once (each to another allowed
    placement) until `better` takes one; whether it did."""
    for groups in itertools.combinations(range(len(assign)), 3):
        others = [[p for p in np.flatnonzero(allowed[g]) if p != assign[g]] for g in groups]
        for places in itertools.product(*others):
            trial = assign.copy()
            trial[list(groups)] = places
            if better(trial):
                return True
    return False


def _resident_of(problem: Problem) -> dict[int, int]:
    """Each streamed placement -> the resident placement on the same device."""
    return {
        p: next(
            q
            for q, other in enumerate(problem.placements)
            if other.device == pl.device and not problem.place_streamed[q]
        )
        for p, pl in enumerate(problem.placements)
        if problem.place_streamed[p]
    }


def _refill(
    problem: Problem,
    assign: np.ndarray,
    allowed: np.ndarray,
    resident_of: dict[int, int] | None = None,
    prices: Prices | None = None,
) -> np.ndarray:
    """`assign` with streamed groups made resident on their device: all of them when they
    fit (their streaming slots are then freed too), else one by one while they fit, the
    largest time saving first. `resident_of`: `_resident_of(problem)`, and `prices`, when the
    caller has them."""
    if resident_of is None:
        resident_of = _resident_of(problem)
    overflow = problem.excess if prices is None else prices.overflow
    gains = []
    for i in range(problem.n):
        p = int(assign[i])
        q = resident_of.get(p)
        if q is not None and allowed[i, q] and problem.unary[i, p] > problem.unary[i, q]:
            gains.append((problem.unary[i, p] - problem.unary[i, q], i, q))
    out = assign.copy()
    for _, i, q in gains:  # all of them: streaming's two slots go too
        out[i] = q
    if not overflow(out) > 0:
        return out
    out = assign
    for _, i, q in sorted(gains, reverse=True):
        trial = out.copy()
        trial[i] = q
        if not overflow(trial) > 0:
            out = trial
    return out
