"""The partitioning problem as cost arrays (no torch, no graphs): what every algorithm solves.

Groups 0..n-1 are in a topological order. A placement is (device, weight home): the device
that computes and whether its weights stay resident there or stream in from the host's
memory. An assignment maps each group to a placement.

Latency objective (one request, partitions run one after another):
    sum_i base[i, a_i] + sum_(u,v) bytes_uv * link_inv_bw[dev(a_u), dev(a_v)]
    + sum over pairs (run P, run Q) on two devices with a value from P to Q of
      link_latency[dev(P), dev(Q)]
    + per run that reads the caller's inputs in_latency[dev], per run that writes model
      outputs out_latency[dev]
where base holds compute (max(compute, weight stream) for streamed placements) plus the
bytes of the group's user inputs from, and model outputs to, the caller's device. The
runtime sends one packet from a partition to each partition that reads from it, holding
every value that one reads, so a link's latency and the executor's hop are paid once per
pair of partitions, its bandwidth per byte. Partitions are the runs of one placement along
the order (`stages`). The assembled plan's walk (`assemble.form_partitions`) cuts at the
same places where each group reads from the one before it (a chain of blocks); where the
order interleaves independent groups it may merge runs, and the plan's transfers follow its
own partitions. A transfer into
a device starts a partition there and pays its call (`call`); so does reading the caller's
inputs, on the caller's own device too, while handing outputs back starts nothing: each
stage of a pipeline pays one call, as the assembled plan's partitions do. Where the caller
is a process apart from the workers (Ray's driver), its inputs reach, and its outputs
leave, the origin device's worker through a hop too (`caller_hop`).

`unary` and `edge_cost` price each group and each value as if it were a partition and a
packet of its own: an upper bound on `latency` that the heuristics' pairwise models (the
min-cut, list scheduling) work with.

Throughput objective (a pipeline): stages are maximal runs of one placement along the
order, each on its own device. A stage takes the values live across its first boundary
from the previous stage (forwarded along the pipeline), computes, and the slowest stage
sets the steady-state time per microbatch.

A third weight home, `split` (GPU devices with a host CPU, for generation), runs a group's
weight matmuls partly on the GPU, with that share of the weights streamed in, and partly on
the host CPU from host memory, at the same time: the link and the CPU each carry part of
the bytes (partitioner/gpu_cpu_split.py prices it and picks the share).

Where weight copies overlap other groups' work (a decode step: the link streams the next
layer's weights while the CPU runs a layer), `copy_s`/`own_s` are set and latency replays the
step instead of summing (overlap.py).

Memory per device: resident parameters + 2 x the largest streamed item (a streamed group's
parameters, or a split group's GPU share: double buffering, one slot computes while the
next fills) + the state of every group it runs (a KV cache stays where its layer runs,
whatever the weights do) + the peak of live activations over its groups; must fit
`capacity`. `act_bytes[i]` is the liveness-walk peak while a
group-i op runs (coarsen.live_bytes): everything produced and still needed, including the
values crossing its boundaries and model outputs held for the caller, not only its
largest single tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from hetero.partitioner.algorithms.overlap import overlapped_latency

RESIDENT, STREAMED, SPLIT = "resident", "streamed", "split"
INF = float("inf")


@dataclass(frozen=True)
class Placement:
    device: int  # index into Problem.devices
    weights: str = RESIDENT  # resident | streamed | split


@dataclass(frozen=True, eq=False)
class Problem:
    names: tuple[str, ...]  # groups, topological order
    devices: tuple[str, ...]
    placements: tuple[Placement, ...]
    compute: np.ndarray  # [n, P] seconds to compute group i at placement p; inf: not allowed
    edges: np.ndarray  # [E, 2] group indices (u < v)
    edge_bytes: np.ndarray  # [E]
    link_latency: np.ndarray  # [D, D] seconds per transfer (0 on the diagonal)
    link_inv_bw: np.ndarray  # [D, D] seconds per byte (0 on the diagonal)
    param_bytes: np.ndarray  # [n]
    act_bytes: np.ndarray  # [n] peak live activation bytes while the group runs
    capacity: np.ndarray  # [D] bytes
    in_bytes: np.ndarray = field(default=None)  # [n] user inputs read (from the origin)
    out_bytes: np.ndarray = field(default=None)  # [n] model outputs written (to the origin)
    origin: int = 0  # the device the caller's inputs come from and outputs go to
    state_bytes: np.ndarray = field(default=None)  # [n] buffers updated in place (KV cache)
    split_bytes: np.ndarray = field(default=None)  # [n] a split group's GPU share per step
    # [D] bytes a device's two streaming slots take at least while some group is not
    # resident there: a generation's prefill streams whole layers through the slots its
    # decode shares (0: no floor)
    slot_floor: np.ndarray = field(default=None)
    # [D] seconds to start a partition on each device (its call and the executor's work
    # around it): `link_latency` into a device includes it, since a hop starts a partition
    # there. Priced apart where no hop does: the stage that reads the caller's inputs on
    # the origin device pays its own call, and handing outputs back to the caller starts
    # nothing (0: not priced)
    call: np.ndarray = field(default=None)
    # seconds the caller's values take into, and out of, a worker on the origin device: a
    # hop where the caller is a process apart (Ray's driver; the other devices' hops are in
    # `link_latency`), 0 in process
    caller_hop: float = 0.0
    # [n, P] where weight copies overlap other groups' work (a generation's decode step):
    # seconds the link spends bringing a streamed or split placement's weights in per run
    # (0 for the others), and each placement's time with its weights at hand. Set: latency
    # replays the step (overlap.schedule) instead of summing; None: additive.
    copy_s: np.ndarray | None = None
    own_s: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = len(self.names)
        for name in ("in_bytes", "out_bytes", "state_bytes", "split_bytes"):
            if getattr(self, name) is None:
                object.__setattr__(self, name, np.zeros(n))
        if self.slot_floor is None:
            object.__setattr__(self, "slot_floor", np.zeros(len(self.devices)))
        if self.call is None:
            object.__setattr__(self, "call", np.zeros(len(self.devices)))
        d = len(self.devices)
        for name in ("link_latency", "link_inv_bw"):  # staying on a device costs nothing
            m = np.array(getattr(self, name), dtype=float)
            m[np.arange(d), np.arange(d)] = 0.0
            object.__setattr__(self, name, m)
        dev = np.array([p.device for p in self.placements], dtype=int)
        object.__setattr__(self, "place_device", dev)
        # split groups keep their weights in host memory too: no resident bytes on the GPU
        streamed = np.array([p.weights in (STREAMED, SPLIT) for p in self.placements], bool)
        object.__setattr__(self, "place_streamed", streamed)
        split = np.array([p.weights == SPLIT for p in self.placements], dtype=bool)
        object.__setattr__(self, "place_split", split)
        # [E, D, D]: each edge's transfer between every pair of devices, as a packet of its
        # own (the heuristics' pairwise bound; `latency` pays the latency once per pair)
        ec = self.link_latency[None, :, :] + self.edge_bytes[:, None, None] * self.link_inv_bw
        ec[:, np.arange(d), np.arange(d)] = 0.0
        object.__setattr__(self, "edge_cost", ec)
        # [E, D, D]: the bytes' part alone, what `latency` pays per value
        object.__setattr__(self, "_edge_bytes_s", self.edge_bytes[:, None, None] * self.link_inv_bw)
        # the caller's inputs start a partition wherever they go (on the origin too); the
        # outputs' way back is the link's alone
        from_origin = self.link_latency[self.origin].copy()
        from_origin[self.origin] = self.call[self.origin] + self.caller_hop
        to_origin = np.maximum(self.link_latency[:, self.origin] - self.call[self.origin], 0.0)
        to_origin[self.origin] = self.caller_hop
        object.__setattr__(self, "in_latency", from_origin)
        object.__setattr__(self, "_reads", np.flatnonzero(self.in_bytes > 0))
        object.__setattr__(self, "_writes", np.flatnonzero(self.out_bytes > 0))
        object.__setattr__(self, "out_latency", to_origin)
        io_bytes = (
            self.in_bytes[:, None] * self.link_inv_bw[self.origin][None, :]
            + self.out_bytes[:, None] * self.link_inv_bw[:, self.origin][None, :]
        )  # [n, D]
        object.__setattr__(self, "base", self.compute + io_bytes[:, dev])
        io_latency = np.where(self.in_bytes[:, None] > 0, from_origin[None, :], 0) + np.where(
            self.out_bytes[:, None] > 0, to_origin[None, :], 0
        )  # [n, D]
        object.__setattr__(self, "unary", self.base + io_latency[:, dev])

    # ---- sizes -----------------------------------------------------------------------------
    @property
    def n(self) -> int:
        return len(self.names)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    @property
    def num_placements(self) -> int:
        return len(self.placements)

    def allowed(self) -> np.ndarray:
        return np.isfinite(self.compute)

    def transfer(self, nbytes: float, a: int, b: int) -> float:
        if a == b or nbytes <= 0:
            return 0.0
        return float(self.link_latency[a, b] + nbytes * self.link_inv_bw[a, b])

    # ---- evaluation ------------------------------------------------------------------------
    @cached_property
    def rows(self) -> Rows:
        """The arrays one assignment is priced with, as Python values (made once)."""
        return Rows.of(self)

    def memory(self, assign: np.ndarray) -> np.ndarray:
        """[D] bytes each device needs under `assign` (placement per group; -1: unplaced)."""
        return np.array(self.rows.memory(assign.tolist()))

    def overflow(self, assign: np.ndarray) -> np.ndarray:
        """[D] bytes over capacity (0 where it fits)."""
        return np.maximum(self.memory(assign) - self.capacity, 0.0)

    def excess(self, assign: np.ndarray) -> float:
        """`overflow(assign).sum()`, the same float, without arrays (a search's inner loop)."""
        cap = self.rows.capacity
        return np_sum(
            [max(m - c, 0.0) for m, c in zip(self.rows.memory(assign.tolist()), cap, strict=True)]
        )

    def feasible(self, assign: np.ndarray) -> bool:
        allowed = np.isfinite(self.compute[np.arange(self.n), assign]).all()
        return bool(allowed and not self.overflow(assign).any())

    @property
    def overlapped(self) -> bool:
        return self.copy_s is not None

    def latency(self, assign: np.ndarray) -> float:
        """Seconds for one request under `assign` (inf where a group is not allowed)."""
        if self.overlapped:
            return overlapped_latency(self, assign)
        # one assignment at a time (the local searches' inner loop): `latencies`' rule,
        # with the pairs marked in a runs x runs table instead of ranking every edge
        dev = self.place_device[assign]
        change = np.flatnonzero(assign[1:] != assign[:-1]) + 1
        run = np.zeros(self.n, dtype=int)
        run[change] = 1
        run = np.cumsum(run)
        t = self.base[np.arange(self.n), assign].sum()
        for at, lat in ((self._reads, self.in_latency), (self._writes, self.out_latency)):
            if len(at):
                r = run[at]
                first = np.ones(len(r), dtype=bool)
                first[1:] = r[1:] != r[:-1]
                t += lat[dev[at[first]]].sum()
        if len(self.edges):
            a, b = dev[self.edges[:, 0]], dev[self.edges[:, 1]]
            t += self._edge_bytes_s[np.arange(len(a)), a, b].sum()
            cross = np.flatnonzero(a != b)
            if len(cross):
                runs = len(change) + 1
                starts = np.zeros(runs, dtype=int)
                starts[1:] = change
                run_dev = dev[starts]
                pair = run[self.edges[cross, 0]] * runs + run[self.edges[cross, 1]]
                if runs * runs <= 8 * len(cross) + 1024:
                    seen = np.zeros(runs * runs, dtype=bool)
                    seen[pair] = True
                    pair = np.flatnonzero(seen)
                else:
                    pair = np.unique(pair)
                t += self.link_latency[run_dev[pair // runs], run_dev[pair % runs]].sum()
        return float(t)

    def latencies(self, assign: np.ndarray) -> np.ndarray:
        """[B] `latency` of each row of `assign` [B, n], additively (no overlap replay)."""
        idx = np.arange(self.n)[None, :]
        t = self.base[idx, assign].sum(axis=1) + self.caller_latency(assign).sum(axis=1)
        if len(self.edges):
            dev = self.place_device[assign]
            a, b = dev[:, self.edges[:, 0]], dev[:, self.edges[:, 1]]
            t = t + (self.edge_bytes[None, :] * self.link_inv_bw[a, b]).sum(axis=1)
            t = t + np.where(self.pair_heads(assign), self.link_latency[a, b], 0.0).sum(axis=1)
        return t

    def pair_heads(self, assign: np.ndarray) -> np.ndarray:
        """[B, E] for `assign` [B, n]: the edges that pay their pair's latency (the link's,
        the executor's hop and the call it starts), one per (sending run, receiving run) on
        two devices: the pair's edge into the earliest group of the receiving run."""
        u, v = self.edges[:, 0], self.edges[:, 1]
        dev = self.place_device[assign]
        run = run_index(assign)
        n1 = self.n + 1
        pair = np.where(dev[:, u] != dev[:, v], run[:, u] * n1 + run[:, v], -1)
        order = np.argsort(pair * n1 + v[None, :], axis=1, kind="stable")
        ranked = np.take_along_axis(pair, order, axis=1)
        first = ranked != np.concatenate([np.full((len(pair), 1), -2), ranked[:, :-1]], axis=1)
        heads = np.zeros(pair.shape, dtype=bool)
        np.put_along_axis(heads, order, first & (ranked >= 0), axis=1)
        return heads

    def caller_latency(self, assign: np.ndarray) -> np.ndarray:
        """[B, n] for `assign` [B, n]: the caller's latencies, once per run on its first
        group that reads the caller's inputs and on its first that writes model outputs
        (one packet each way, as between partitions)."""
        out = np.zeros(assign.shape)
        run = run_index(assign)
        dev = self.place_device[assign]
        for used, lat in (
            (self.in_bytes > 0, self.in_latency),
            (self.out_bytes > 0, self.out_latency),
        ):
            at = np.flatnonzero(used)
            if not len(at):
                continue
            r = run[:, at]
            first = np.concatenate([np.ones((len(r), 1), bool), r[:, 1:] != r[:, :-1]], axis=1)
            out[:, at] += np.where(first, lat[dev[:, at]], 0.0)
        return out

    def live_bytes(self) -> np.ndarray:
        """[n+1] bytes of values crossing boundary s (produced before group s, used at/after)."""
        live = np.zeros(self.n + 1)
        for (u, v), b in zip(self.edges, self.edge_bytes, strict=True):
            live[u + 1 : v + 1] += b
        return live

    def stages(self, assign: np.ndarray) -> list[tuple[int, int, int]]:
        """(start, stop, placement) runs of one placement along the order."""
        out: list[tuple[int, int, int]] = []
        for i, p in enumerate(assign):
            if out and out[-1][2] == p:
                out[-1] = (out[-1][0], i + 1, int(p))
            else:
                out.append((i, i + 1, int(p)))
        return out

    def stage_times(self, assign: np.ndarray, live: np.ndarray | None = None) -> list[float]:
        """Per pipeline stage: incoming forwarded values + compute (+ caller I/O)."""
        live = self.live_bytes() if live is None else live
        times = []
        prev = None
        caller = self.caller_latency(assign[None, :])[0]
        for start, stop, p in self.stages(assign):
            t = float(self.base[start:stop, p].sum() + caller[start:stop].sum())
            if prev is not None:
                t += self.transfer(live[start], self.place_device[prev], self.place_device[p])
            times.append(t)
            prev = p
        return times

    def pipeline_valid(self, assign: np.ndarray) -> bool:
        """Each stage on its own device."""
        devs = [self.place_device[p] for _, _, p in self.stages(assign)]
        return len(devs) == len(set(devs))

    def throughput(self, assign: np.ndarray) -> float:
        """Steady-state seconds per microbatch (the slowest stage); inf if not a pipeline."""
        if not self.pipeline_valid(assign):
            return INF
        return max(self.stage_times(assign))

    def segment_memory(self, start: int, stop: int, p: int) -> float:
        params = (
            self.split_bytes[start:stop] if self.place_split[p] else self.param_bytes[start:stop]
        )
        w = 2 * params.max() if self.place_streamed[p] else params.sum()
        state = self.state_bytes[start:stop].sum()
        return float(w + state + self.act_bytes[start:stop].max())


@dataclass(frozen=True)
class Rows:
    """A problem's arrays as tuples of Python floats, for pricing one assignment at a time:
    on a few dozen groups numpy's cost per call exceeds the arithmetic, and a local search
    prices thousands of assignments. The prices take the arrays' operations in their order
    (sums in numpy's, `np_sum`), so they are the same floats and the search the same search."""

    device: tuple[int, ...]  # [P] per placement
    streamed: tuple[bool, ...]  # [P]
    split: tuple[bool, ...]  # [P]
    allowed: tuple[tuple[bool, ...], ...]  # [n][P]
    param: tuple[float, ...]  # [n]
    split_item: tuple[float, ...]  # [n] a split group's GPU share
    state: tuple[float, ...]  # [n]
    act: tuple[float, ...]  # [n]
    weighted: int  # groups with parameters
    # parameter and state bytes are whole numbers that sum exactly in any order (a model's
    # are; random problems' are not): summed by the builtin, not in numpy's order
    whole: bool
    slot_floor: tuple[float, ...]  # [D]
    capacity: tuple[float, ...]  # [D]
    # [n][P] seconds no step can spend less on group i at placement p (its own time and its
    # caller bytes, the other terms only add): prices a trial that cannot win away unreplayed
    least: tuple[tuple[float, ...], ...]
    own: tuple[tuple[float, ...], ...] | None  # [n][P] `own_s` (overlapped problems)
    copy: tuple[tuple[float, ...], ...] | None  # [n][P] `copy_s`
    io: tuple[tuple[float, ...], ...]  # [n][P] the caller's bytes: base - compute
    edges: tuple[tuple[int, int, float], ...]  # (u, v, bytes) per edge, in order
    inv_bw: tuple[tuple[float, ...], ...]  # [D][D]
    link_latency: tuple[tuple[float, ...], ...]  # [D][D]
    reads: tuple[int, ...]  # groups reading the caller's inputs, in order
    writes: tuple[int, ...]  # groups writing model outputs, in order
    in_latency: tuple[float, ...]  # [D]
    out_latency: tuple[float, ...]  # [D]

    @classmethod
    def of(cls, p: Problem) -> Rows:
        def rows(a: np.ndarray) -> tuple:
            return tuple(map(tuple, a.tolist()))

        with np.errstate(invalid="ignore"):  # inf - inf where a placement is not allowed
            io = p.base - p.compute
            least = p.base if p.copy_s is None else p.own_s + io
        return cls(
            device=tuple(p.place_device.tolist()),
            streamed=tuple(p.place_streamed.tolist()),
            split=tuple(p.place_split.tolist()),
            allowed=rows(p.allowed()),
            param=_floats(p.param_bytes),
            split_item=_floats(p.split_bytes),
            state=_floats(p.state_bytes),
            act=_floats(p.act_bytes),
            weighted=int((p.param_bytes > 0).sum()),
            whole=_whole(p.param_bytes, p.state_bytes),
            slot_floor=_floats(p.slot_floor),
            capacity=_floats(p.capacity),
            least=rows(least),
            own=None if p.own_s is None else rows(p.own_s),
            copy=None if p.copy_s is None else rows(p.copy_s),
            io=rows(io),
            edges=tuple(
                (int(u), int(v), float(b)) for (u, v), b in zip(p.edges, p.edge_bytes, strict=True)
            ),
            inv_bw=rows(p.link_inv_bw),
            link_latency=rows(p.link_latency),
            reads=tuple(p._reads.tolist()),
            writes=tuple(p._writes.tolist()),
            in_latency=tuple(p.in_latency.tolist()),
            out_latency=tuple(p.out_latency.tolist()),
        )

    def memory(self, assign: list[int]) -> list[float]:
        """`Problem.memory` of `assign` (a placement per group; -1: unplaced)."""
        d = len(self.capacity)
        total = sum if self.whole else np_sum
        resident: list[list[float]] = [[] for _ in range(d)]
        state: list[list[float]] = [[] for _ in range(d)]
        act: list[list[float]] = [[] for _ in range(d)]
        item: list[float | None] = [None] * d  # the largest streamed item
        weighted_here = [0] * d  # weighted groups resident on the device
        for i, p in enumerate(assign):
            if p < 0:
                continue
            k = self.device[p]
            state[k].append(self.state[i])
            act[k].append(self.act[i])
            if self.streamed[p]:
                x = self.split_item[i] if self.split[p] else self.param[i]
                if item[k] is None or x > item[k]:
                    item[k] = x
            else:
                resident[k].append(self.param[i])
                weighted_here[k] += self.param[i] > 0
        mem = [0.0] * d
        for k in range(d):
            if not act[k]:
                continue
            slots = 2 * item[k] if item[k] is not None else 0.0
            if self.slot_floor[k] and weighted_here[k] < self.weighted:
                slots = max(slots, self.slot_floor[k])
            mem[k] = total(resident[k]) + slots + total(state[k]) + max(act[k])
        return mem


def _whole(*arrays: np.ndarray) -> bool:
    both = np.concatenate([np.asarray(a, dtype=float) for a in arrays])
    return bool(np.all(both == np.round(both)) and np.abs(both).sum() < 2.0**53)


def _floats(a) -> tuple[float, ...]:
    return tuple(np.asarray(a, dtype=float).tolist())


def np_sum(values: list[float]) -> float:
    """`np.array(values).sum()` without the array: numpy's pairwise order (eight running sums
    over blocks of up to 128, halves above), so the same float. Byte counts are whole
    numbers that any order sums exactly; random problems' are not."""
    return 0.0 + _pairwise(values, 0, len(values)) if values else 0.0


def _pairwise(a: list[float], lo: int, n: int) -> float:
    if n < 8:
        res = 0.0
        for x in a[lo : lo + n]:
            res += x
        return res
    if n <= 128:
        r = a[lo : lo + 8]
        i = 8
        while i < n - n % 8:
            r = [r[j] + a[lo + i + j] for j in range(8)]
            i += 8
        res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
        for x in a[lo + i : lo + n]:
            res += x
        return res
    half = n // 2
    half -= half % 8
    return _pairwise(a, lo, half) + _pairwise(a, lo + half, n - half)


def run_index(assign: np.ndarray) -> np.ndarray:
    """[B, n] for `assign` [B, n]: which run of one placement along the order each group is in."""
    change = np.zeros(assign.shape, dtype=int)
    change[:, 1:] = assign[:, 1:] != assign[:, :-1]
    return np.cumsum(change, axis=1)


@dataclass(frozen=True)
class Solution:
    assign: np.ndarray  # [n] placement index per group
    seconds: float  # what the objective measures: one request, or one microbatch (pipeline)
    algorithm: str
    notes: tuple[str, ...] = ()
