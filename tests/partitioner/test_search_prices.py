"""The local search's fast prices (`Rows`, the replay in Python floats, `Prices`) against the
array versions they replaced: the same floats, so the search makes the same moves."""

from __future__ import annotations

from collections import Counter

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetero.partitioner.algorithms.latency import Prices, _local_search
from hetero.partitioner.algorithms.overlap import caller_io, schedule
from hetero.partitioner.algorithms.problem import (
    RESIDENT,
    SPLIT,
    STREAMED,
    Placement,
    Problem,
    np_sum,
)

_FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def random_step(seed: int, n: int, *, overlapped: bool = True, whole: bool = False) -> Problem:
    """Groups on a GPU (resident / streamed / split), a second GPU and a CPU, with fractional
    bytes (so summation order shows; `whole`: whole numbers, as a model's), random edges,
    several groups reading the caller's inputs and writing outputs, a slot floor and a
    capacity that binds."""
    rng = np.random.default_rng(seed)
    placements = (
        Placement(0, RESIDENT), Placement(0, STREAMED), Placement(0, SPLIT),
        Placement(1, RESIDENT), Placement(1, STREAMED), Placement(2, RESIDENT),
    )  # fmt: skip
    own = rng.uniform(0.1, 5, (n, len(placements)))
    copy = np.where([0, 1, 1, 0, 1, 0], rng.uniform(0.1, 5, (n, len(placements))), 0.0)
    compute = np.maximum(own, copy)
    compute[rng.random(compute.shape) < 0.15] = np.inf
    compute[:, 5] = own[:, 5]  # the CPU runs everything
    edges = [(u, v) for v in range(1, n) for u in range(v) if u == v - 1 or rng.random() < 0.2]
    params = rng.uniform(0, 10, n)
    params[rng.random(n) < 0.2] = 0.0
    state = rng.uniform(0, 2, n)
    if whole:
        params, state = np.round(params * 1e6), np.round(state * 1e6)
    lat = rng.uniform(0, 0.3, (3, 3))
    return Problem(
        names=tuple(f"g{i}" for i in range(n)),
        devices=("gpu0", "gpu1", "cpu"),
        placements=placements,
        compute=compute,
        edges=np.array(edges, dtype=int).reshape(-1, 2),
        edge_bytes=rng.uniform(0, 3, len(edges)),
        link_latency=lat + lat.T,
        link_inv_bw=rng.uniform(0.1, 1, (3, 3)),
        param_bytes=params,
        act_bytes=rng.uniform(0, 1, n),
        capacity=np.r_[rng.uniform(0.5, 1.1, 2) * params.sum(), 1e9],
        in_bytes=(rng.random(n) < 0.3) * rng.uniform(0.5, 2, n),
        out_bytes=(rng.random(n) < 0.3) * rng.uniform(0.5, 2, n),
        state_bytes=state,
        split_bytes=params * rng.uniform(0.2, 0.8, n),
        slot_floor=np.r_[rng.uniform(0, 2) * params.max(initial=1.0), 0.0, 0.0],
        call=rng.uniform(0, 0.1, 3),
        caller_hop=float(rng.uniform(0, 0.5)),
        copy_s=copy if overlapped else None,
        own_s=own if overlapped else None,
    )


def random_assignment(p: Problem, rng: np.random.Generator) -> np.ndarray:
    allowed = p.allowed()
    return np.array([rng.choice(np.flatnonzero(allowed[i])) for i in range(p.n)])


def memory_with_arrays(p: Problem, assign: np.ndarray) -> np.ndarray:
    """`Problem.memory` as it was written with arrays."""
    mem = np.zeros(p.num_devices)
    placed = assign >= 0
    dev = np.where(placed, p.place_device[np.maximum(assign, 0)], -1)
    streamed = p.place_streamed[np.maximum(assign, 0)] & placed
    split = p.place_split[np.maximum(assign, 0)] & placed
    item = np.where(split, p.split_bytes, p.param_bytes)
    for d in range(p.num_devices):
        on = dev == d
        if not on.any():
            continue
        res = on & ~streamed
        st = on & streamed
        slots = 2 * item[st].max() if st.any() else 0.0
        if p.slot_floor[d] and ((p.param_bytes > 0) & ~res).any():
            slots = max(slots, p.slot_floor[d])
        mem[d] = p.param_bytes[res].sum() + slots + p.state_bytes[on].sum() + p.act_bytes[on].max()
    return mem


def schedule_with_arrays(p: Problem, assign: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """`overlap.schedule` as it was written with arrays: (step, start, end)."""
    n = p.n
    idx = np.arange(n)
    dev = p.place_device[assign]
    own = p.own_s[idx, assign] + caller_io(p, assign)
    copy = p.copy_s[idx, assign]
    streamed = p.place_streamed[assign] & (copy > 0)
    incoming = np.zeros(n)
    if len(p.edges):
        u, v = p.edges[:, 0], p.edges[:, 1]
        a, b = dev[u], dev[v]
        np.add.at(incoming, v, p.edge_bytes * p.link_inv_bw[a, b])
        heads = p.pair_heads(assign[None, :])[0]
        np.add.at(incoming, v[heads], p.link_latency[a[heads], b[heads]])
    items = Counter(dev[streamed].tolist())
    link_free = dict.fromkeys(items, 0.0)
    ends: dict[int, list[float]] = {d: [] for d in items}
    start, end = np.zeros(n), np.zeros(n)
    t = step_start = 0.0
    for _ in range(3):
        step_start = t
        for i in range(n):
            s = t + float(incoming[i])
            if streamed[i]:
                d = int(dev[i])
                done = ends[d]
                ready = s if items[d] == 1 else (done[-2] if len(done) >= 2 else 0.0)
                copied = max(link_free[d], ready) + float(copy[i])
                link_free[d] = copied
                e_i = max(s, copied) + float(own[i])
                done.append(e_i)
            else:
                e_i = s + float(own[i])
            start[i], end[i] = s, e_i
            t = e_i
    return t - step_start, start - step_start, end - step_start


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(0, 300))
def test_np_sum_is_numpys_sum(seed, n):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 10, n) * 10.0 ** rng.uniform(-3, 3, n)
    assert np_sum(x.tolist()) == x.sum()


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40), whole=st.booleans())
def test_memory_is_the_arrays_memory(seed, n, whole):
    p = random_step(seed, n, whole=whole)
    assert p.rows.whole == whole
    rng = np.random.default_rng(seed)
    for _ in range(5):
        assign = random_assignment(p, rng)
        assign[rng.random(n) < 0.2] = -1  # unplaced, as list scheduling asks
        want = memory_with_arrays(p, assign)
        assert p.memory(assign).tolist() == want.tolist()
        assert p.excess(assign) == np.maximum(want - p.capacity, 0.0).sum()


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 40))
def test_the_replay_is_the_arrays_replay(seed, n):
    p = random_step(seed, n)
    rng = np.random.default_rng(seed)
    for _ in range(5):
        assign = random_assignment(p, rng)
        step, start, end = schedule_with_arrays(p, assign)
        got = schedule(p, assign)
        assert (got.seconds, got.start.tolist(), got.end.tolist()) == (
            step,
            start.tolist(),
            end.tolist(),
        )
        assert p.latency(assign) == step


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 16), overlapped=st.booleans())
def test_prices_refuse_only_trials_that_lose(seed, n, overlapped):
    """Memory first and the lower bound skip work, never a decision: `improves` agrees with
    comparing full keys, for trials near the best (one group moved) and anywhere."""
    p = random_step(seed, n, overlapped=overlapped)
    rng = np.random.default_rng(seed)
    prices = Prices(p)
    best = random_assignment(p, rng)
    key = (float(p.overflow(best).sum()), p.latency(best))
    for k in range(30):
        trial = random_assignment(p, rng) if k % 2 else best.copy()
        if k % 2 == 0:
            i = rng.integers(n)
            trial[i] = rng.choice(np.flatnonzero(p.allowed()[i]))
        full = (float(p.overflow(trial).sum()), p.latency(trial))
        wins = full[0] < key[0] or (full[0] == key[0] and full[1] < key[1] - 1e-12)
        got = prices.improves(trial, key)
        assert (got is not None) == wins
        assert got is None or got == full


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 10))
def test_searches_sharing_prices_end_where_each_would_alone(seed, n):
    """A search that reaches a pass another one started from stops there with that one's
    result: the same as searching on."""
    p = random_step(seed, n)
    rng = np.random.default_rng(seed)
    allowed = p.allowed()
    shared = Prices(p)
    for _ in range(4):
        start = random_assignment(p, rng)
        alone = _local_search(p, start, allowed, trades=True)
        assert _local_search(p, start, allowed, trades=True, prices=shared).tolist() == (
            alone.tolist()
        )
