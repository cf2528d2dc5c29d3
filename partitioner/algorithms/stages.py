"""Contiguous stages over device classes and host groups, by dynamic programming over counts.

A plan is a sequence of stages (contiguous runs of the topological order), each on its own
device instance; it visits hosts one after another (a host's stages are consecutive: Alpa's
contiguous node groups) and, inside a host, its instances in any order. A stage's time is
its groups' compute (+ caller I/O) plus the values live across its first boundary,
forwarded from the previous stage (`Problem.stage_times`). Instances of one class are
interchangeable, so the state holds counts, not names:

    (placement class of the last stage, host type of the current host,
     instances used per class on the current host, hosts used per type)

and the value per state is an array over where the last stage stops. States are processed
in increasing (hosts used, instances used on the current host), which every transition
increases, so each state is final when it is expanded.

Objectives: a pipelined one (THROUGHPUT) minimises the slowest stage (pass 1); among plans within it, the
slowest stage leaving out the copy of the model's outputs to the caller (pass 2: when that
copy alone sets the bottleneck, the other stages still balance); among those, the sum of
stage times (pass 3). Each pass is exact, unlike one lexicographic key kept per state.
LATENCY minimises the sum (one request through the stages, values forwarded).

Exactness: for the pipeline model of `problem.py`, pass 1 is exact over plans that visit
each host once; with one host that is every pipeline. `bottleneck_bound` relaxes counts and
host relations for a lower bound over every pipeline.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from hetero.partitioner.algorithms.problem import INF, Placement
from hetero.partitioner.algorithms.symmetry import Slot
from hetero.partitioner.algorithms.tiers import Tiers
from hetero.partitioner.decisions import Objective

_TOL = 1e-9  # relative slack when pass 2 keeps stages within pass 1's bottleneck


@dataclass(frozen=True)
class Stage:
    start: int
    stop: int
    placement: int  # placement class
    host_type: int
    host: int  # which host of that type (in the order the plan visits them)
    instance: int  # which instance of the class on that host
    seconds: float  # stage time (compute + incoming transfer)


@dataclass(frozen=True)
class StagePlan:
    stages: tuple[Stage, ...]
    bottleneck: float  # the slowest stage
    total: float  # the sum of stage times
    states: int  # DP states expanded (for notes and benchmarks)


def segment_costs(tiers: Tiers, t: int, *, outputs: bool = True) -> np.ndarray:
    """[n+1, n+1, K]: compute (+ caller I/O) of groups start..stop-1 at each placement class
    on a host of type t; inf where a group is not allowed there or the stage does not fit
    one instance's memory (resident: all parameters; streamed: two slots of the largest; the
    state of every group and the peak of activations either way).
    outputs=False leaves out returning the model's outputs to the caller."""
    n, k_n = tiers.n, tiers.num_placements
    u = tiers.unary[t]
    if not outputs and tiers.out_io is not None:
        u = u - tiers.out_io[t]
    finite = np.isfinite(u)
    csum = np.vstack([np.zeros(k_n), np.cumsum(np.where(finite, u, 0.0), axis=0)])
    cbad = np.vstack([np.zeros(k_n, dtype=int), np.cumsum(~finite, axis=0)])
    seg = csum[None, :, :] - csum[:, None, :]
    # the caller's packet into (out of) a stage, once for all its groups that read (write)
    for used, lat in (
        (tiers.reads, tiers.in_lat),
        (tiers.writes if outputs else None, tiers.out_lat),
    ):
        if used is None or lat is None:
            continue
        count = np.r_[0, np.cumsum(used)]
        seg = seg + ((count[None, :] - count[:, None]) > 0)[:, :, None] * lat[t][None, None, :]
    bad = (cbad[None, :, :] - cbad[:, None, :]) > 0
    p = tiers.param_bytes
    psum = np.r_[0.0, np.cumsum(p)]
    pmax = np.zeros((n + 1, n + 1))
    amax = np.zeros((n + 1, n + 1))
    for start in range(n):
        pmax[start, start + 1 :] = np.maximum.accumulate(p[start:])
        amax[start, start + 1 :] = np.maximum.accumulate(tiers.act_bytes[start:])
    state = np.zeros(n) if tiers.state_bytes is None else tiers.state_bytes
    state = np.r_[0.0, np.cumsum(state)]
    held = state[None, :] - state[:, None] + amax  # a KV cache stays where its layer runs
    resident = psum[None, :] - psum[:, None] + held
    streamed = 2 * pmax + held
    need = np.where(tiers.streamed[None, None, :], streamed[:, :, None], resident[:, :, None])
    cap = tiers.capacity[tiers.place_class][None, None, :]
    order = np.arange(n + 1)
    ok = (order[None, :] > order[:, None])[:, :, None] & ~bad & (need <= cap)
    return np.where(ok, seg, INF)


def pipeline(
    tiers: Tiers,
    objective: Objective,
    *,
    progress: Callable[[int], None] | None = None,
) -> StagePlan | None:
    """The best stage plan for `objective`; None if none fits."""
    search = _Search(tiers, progress, core=objective.pipelined)
    if objective.pipelined:
        slowest = search.run("max")
        if not np.isfinite(slowest):
            return None
        bound = _slack(slowest)
        # Among plans that reach the bottleneck, the slowest stage without returning the
        # outputs to the caller (a copy the link runs while the GPU computes the next
        # microbatch): when that copy alone sets the bottleneck, the other stages still
        # balance, as the plan's own per-stage prediction shows them.
        core = search.run("max", core=True, bound=bound)
        return search.best_path(bound=bound, core_bound=_slack(core))
    return search.best_path(bound=INF)


def _slack(x: float) -> float:
    return x * (1 + _TOL) + 1e-15


def bottleneck_bound(tiers: Tiers) -> float:
    """A lower bound on the slowest stage of any pipeline: unlimited instances, each move at
    the cheapest relation its two classes have, each group at its cheapest host type."""
    n, k_n = tiers.n, tiers.num_placements
    seg = np.min([segment_costs(tiers, t) for t in range(tiers.num_types)], axis=0)
    pc = tiers.place_class
    lat = np.fmin(tiers.intra_lat.min(axis=0), tiers.inter_lat.min(axis=(0, 1)))
    inv = np.fmin(tiers.intra_inv.min(axis=0), tiers.inter_inv.min(axis=(0, 1)))
    f = np.full((k_n, n + 1), INF)
    f[:, 0] = -INF  # the first stage receives nothing
    for stop in range(1, n + 1):
        for k2 in range(k_n):
            c2 = pc[k2]
            best = INF
            for k in range(k_n):
                prev = f[k, :stop]
                if not np.isfinite(prev).any() and not np.isneginf(prev).any():
                    continue
                live = tiers.live[:stop]
                with np.errstate(invalid="ignore"):
                    move = np.where(live > 0, lat[pc[k], c2] + live * inv[pc[k], c2], 0.0)
                move = np.where(np.isneginf(prev), 0.0, move)
                cost = np.maximum(prev, seg[:stop, stop, k2] + move)
                best = min(best, float(cost.min()))
            f[k2, stop] = best
    return float(f[:, n].min())


class _Search:
    def __init__(
        self, tiers: Tiers, progress: Callable[[int], None] | None, *, core: bool = False
    ) -> None:
        self.tiers = tiers
        self.progress = progress
        self.seg = [segment_costs(tiers, t) for t in range(tiers.num_types)]
        self.core = (
            [segment_costs(tiers, t, outputs=False) for t in range(tiers.num_types)]
            if core
            else self.seg
        )
        self.expanded = 0

    def _moves(self, rows: np.ndarray, t: int, c: int, t2: int, c2: int, same: bool):
        return self.tiers.move(self.tiers.live[rows], t, c, t2, c2, same)

    def _successors(self, state):
        """(next state, placement class, host type, same host?) for every next stage."""
        tiers = self.tiers
        _, t, used, hosts = state
        pc = tiers.place_class
        for k2 in range(tiers.num_placements):
            c2 = pc[k2]
            if used[c2] < tiers.counts[t, c2]:
                nxt = list(used)
                nxt[c2] += 1
                yield (k2, t, tuple(nxt), hosts), k2, t, True
        for t2 in range(tiers.num_types):
            if hosts[t2] >= tiers.hosts[t2]:
                continue
            nh = list(hosts)
            nh[t2] += 1
            for k2 in range(tiers.num_placements):
                c2 = pc[k2]
                if tiers.counts[t2, c2] >= 1:
                    fresh = [0] * tiers.num_classes
                    fresh[c2] = 1
                    yield (k2, t2, tuple(fresh), tuple(nh)), k2, t2, False

    def _initial(self):
        tiers = self.tiers
        for t in range(tiers.num_types):
            if tiers.hosts[t] < 1:
                continue
            for k in range(tiers.num_placements):
                c = tiers.place_class[k]
                if tiers.counts[t, c] >= 1:
                    used = [0] * tiers.num_classes
                    used[c] = 1
                    hosts = [0] * tiers.num_types
                    hosts[t] = 1
                    yield (k, t, tuple(used), tuple(hosts)), t, k

    def run(self, mode: str, *, core: bool = False, bound: float = INF) -> float:
        """The smallest slowest stage ("max"), of full stage times or (core=True) of stage
        times without returning outputs, among plans whose stages all take <= bound."""
        value, _ = self._run(mode, core=core, bound=bound, core_bound=INF, paths=False)
        return value

    def best_path(self, *, bound: float, core_bound: float = INF) -> StagePlan | None:
        """The smallest sum of stage times among plans within both bounds."""
        _, path = self._run("sum", core=False, bound=bound, core_bound=core_bound, paths=True)
        return path

    def _stage(self, t: int, rows: np.ndarray | slice, k: int, move, core: bool, bound, cb):
        """(objective term, feasible) per (row, stop) of the stage at placement k on type t."""
        full = self.seg[t][rows, :, k] + move
        ok = (full <= bound) & (self.core[t][rows, :, k] + move <= cb if cb < INF else True)
        term = self.core[t][rows, :, k] + move if core else full
        return np.where(ok, term, INF)

    def _run(self, mode: str, *, core: bool, bound: float, core_bound: float, paths: bool):
        tiers = self.tiers
        n = tiers.n
        cols = np.arange(n + 1)
        ids: dict[tuple, int] = {}
        states: list[tuple] = []
        values: list[np.ndarray] = []
        back_state: list[np.ndarray] = []
        back_stop: list[np.ndarray] = []
        heap: list[tuple[int, int, int]] = []

        def offer(state, cand: np.ndarray, pred: int, pred_stop: np.ndarray | int) -> None:
            i = ids.get(state)
            if i is None:
                i = ids[state] = len(states)
                states.append(state)
                values.append(np.full(n + 1, INF))
                if paths:
                    back_state.append(np.full(n + 1, -1))
                    back_stop.append(np.zeros(n + 1, dtype=int))
                heapq.heappush(heap, (sum(state[3]), sum(state[2]), i))
            better = cand < values[i]
            if better.any():
                values[i][better] = cand[better]
                if paths:
                    back_state[i][better] = pred
                    back_stop[i][better] = pred_stop[better] if np.ndim(pred_stop) else pred_stop

        for state, t, k in self._initial():
            offer(state, self._stage(t, 0, k, 0.0, core, bound, core_bound), -1, 0)
        best, best_state = INF, -1
        while heap:
            _, _, i = heapq.heappop(heap)
            self.expanded += 1
            if self.progress is not None:
                self.progress(1)
            v = values[i]
            if v[n] < best:
                best, best_state = float(v[n]), i
            rows = np.flatnonzero(np.isfinite(v[:n]) & (v[:n] < best))
            if not rows.size:
                continue
            k, t, _, _ = states[i]
            c = tiers.place_class[k]
            base = v[rows][:, None]
            for nxt, k2, t2, same in self._successors(states[i]):
                move = self._moves(rows, t, c, t2, tiers.place_class[k2], same)[:, None]
                stage = self._stage(t2, rows, k2, move, core, bound, core_bound)
                if mode == "max":
                    offer(nxt, np.maximum(base, stage).min(axis=0), i, 0)
                else:
                    total = base + stage
                    arg = total.argmin(axis=0)
                    offer(nxt, total[arg, cols], i, rows[arg])
        if mode == "max" or best_state < 0:
            return best, None
        return best, self._path(states, back_state, back_stop, best_state)

    def _path(self, states, back_state, back_stop, last: int) -> StagePlan:
        tiers = self.tiers
        n = tiers.n
        out: list[Stage] = []
        i, stop = last, n
        while i >= 0:
            k, t, used, hosts = states[i]
            start = int(back_stop[i][stop]) if back_state[i][stop] >= 0 else 0
            c = tiers.place_class[k]
            out.append(Stage(start, stop, k, t, hosts[t] - 1, used[c] - 1, 0.0))
            i, stop = int(back_state[i][stop]), start
        out.reverse()
        timed = []
        prev: Stage | None = None
        for s in out:
            sec = float(self.seg[s.host_type][s.start, s.stop, s.placement])
            if prev is not None:
                same = (prev.host_type, prev.host) == (s.host_type, s.host)
                sec += float(
                    self._moves(
                        np.array([s.start]),
                        prev.host_type,
                        tiers.place_class[prev.placement],
                        s.host_type,
                        tiers.place_class[s.placement],
                        same,
                    )[0]
                )
            timed.append(Stage(s.start, s.stop, s.placement, s.host_type, s.host, s.instance, sec))
            prev = s
        secs = [s.seconds for s in timed]
        return StagePlan(tuple(timed), max(secs), sum(secs), self.expanded)


def slots_of(plan: StagePlan, tiers: Tiers) -> list[tuple[int, int, Slot]]:
    """(start, stop, slot) per stage: where on the cluster each stage runs."""
    return [
        (
            s.start,
            s.stop,
            Slot(int(tiers.place_class[s.placement]), s.host_type, s.host, s.instance),
        )
        for s in plan.stages
    ]


def to_assignment(
    plan: StagePlan,
    tiers: Tiers,
    device_of: Mapping[Slot, int],
    placement_of: Mapping[tuple[int, Placement], int],
) -> np.ndarray:
    """The stage plan as a placement per group of a Problem whose device indices are
    `device_of` and placements `placement_of` ((device, placement key) -> index)."""
    assign = np.zeros(tiers.n, dtype=int)
    for (start, stop, slot), s in zip(slots_of(plan, tiers), plan.stages, strict=True):
        assign[start:stop] = placement_of[(device_of[slot], tiers.place_keys[s.placement])]
    return assign
