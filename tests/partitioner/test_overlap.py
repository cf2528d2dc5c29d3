"""A decode step replayed as the weight streamer runs it: copies overlap other groups' work."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetero.partitioner.algorithms.latency import latency
from hetero.partitioner.algorithms.overlap import schedule
from hetero.partitioner.algorithms.problem import (
    RESIDENT,
    SPLIT,
    STREAMED,
    Placement,
    Problem,
)

GPU_RES, GPU_STREAM, GPU_SPLIT, CPU = range(4)
PLACEMENTS = (Placement(0, RESIDENT), Placement(0, STREAMED), Placement(0, SPLIT), Placement(1))


def layers(n: int, *, copy: float, gpu: float, split_own: float, split_copy: float, cpu: float,
           hop: float = 0.0, capacity: float = 1e12) -> Problem:  # fmt: skip
    """n identical layers in a chain on a GPU (resident / streamed / split) and a CPU."""
    own = np.tile([gpu, gpu, split_own, cpu], (n, 1))
    copy_s = np.tile([0.0, copy, split_copy, 0.0], (n, 1))
    compute = np.maximum(own, copy_s)
    return Problem(
        names=tuple(f"layers.{i}" for i in range(n)),
        devices=("gpu", "cpu"),
        placements=PLACEMENTS,
        compute=compute,
        edges=np.array([(i, i + 1) for i in range(n - 1)], dtype=int).reshape(-1, 2),
        edge_bytes=np.ones(max(n - 1, 0)),
        link_latency=np.array([[0.0, hop], [hop, 0.0]]),
        link_inv_bw=np.zeros((2, 2)),
        param_bytes=np.full(n, 100.0),
        act_bytes=np.zeros(n),
        capacity=np.array([capacity, 1e12]),
        split_bytes=np.full(n, 50.0),
        copy_s=copy_s,
        own_s=own,
    )


def test_split_layers_take_the_slower_of_link_and_host_each():
    for own, copy in ((3.0, 4.0), (4.0, 3.0)):
        p = layers(8, copy=9.0, gpu=0.1, split_own=own, split_copy=copy, cpu=7.0)
        got = p.latency(np.full(8, GPU_SPLIT))
        assert got == pytest.approx(8 * max(own, copy))


def test_streamed_layers_copy_while_cpu_layers_compute():
    """Alternating streamed and CPU layers: the link brings the next streamed layer's
    weights in while the CPU runs the layer between, so the step is the link's time, not
    the sum the additive model charges."""
    p = layers(8, copy=8.0, gpu=0.2, split_own=99.0, split_copy=99.0, cpu=6.0)
    alternate = np.array([GPU_STREAM, CPU] * 4)
    got = p.latency(alternate)
    additive = 4 * 8.0 + 4 * 6.0
    assert got < 0.7 * additive
    assert got == pytest.approx(4 * 8.0, rel=0.05)  # the link never idles
    assert schedule(p, alternate).durations()[1::2] == pytest.approx([6.0] * 4)


def test_one_streamed_item_is_copied_when_it_runs():
    """With one streamed group nothing prefetches it: its copy and its work add up."""
    p = layers(3, copy=5.0, gpu=1.0, split_own=99.0, split_copy=99.0, cpu=2.0)
    got = p.latency(np.array([CPU, GPU_STREAM, CPU]))
    assert got == pytest.approx(2.0 + 5.0 + 1.0 + 2.0)


def test_the_planner_interleaves_when_that_beats_splitting():
    """Split layers that pay a heavy host path lose to streaming every other layer while
    the CPU runs the rest; the additive model could not see it."""
    p = layers(12, copy=8.0, gpu=0.2, split_own=7.5, split_copy=4.0, cpu=6.5, capacity=250)
    sol = latency(p)
    kinds = set(sol.assign.tolist())
    assert {GPU_STREAM, CPU} <= kinds
    assert sol.seconds < 12 * 7.5 * 0.9


_FAST = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(2, 10))
def test_a_step_is_never_shorter_than_either_resource_alone(seed, n):
    """Whatever the placement: at least the link's copies, and at least the host's own work
    (each group waits for its weights; nothing runs twice at once on the host)."""
    rng = np.random.default_rng(seed)
    p = layers(n, copy=rng.uniform(1, 9), gpu=rng.uniform(0.05, 1), split_own=rng.uniform(1, 9),
               split_copy=rng.uniform(1, 9), cpu=rng.uniform(1, 9))  # fmt: skip
    assign = rng.integers(0, 4, n)
    got = p.latency(assign)
    idx = np.arange(n)
    assert got >= p.copy_s[idx, assign].sum() - 1e-9
    assert got >= p.own_s[idx, assign].sum() - 1e-9
    assert got <= p.copy_s[idx, assign].sum() + p.own_s[idx, assign].sum() + 1e-9


def test_values_crossing_between_two_stages_pay_one_hop():
    """A layer reads the hidden state and the tables made before it (rotary, mask): three
    edges from the stage before, one packet in the runtime, so one hop's latency."""
    import dataclasses

    p = layers(4, copy=0.0, gpu=1.0, split_own=99.0, split_copy=99.0, cpu=1.0, hop=5.0)
    fan = dataclasses.replace(
        p, edges=np.array([(0, 1), (0, 2), (0, 3), (1, 2), (2, 3)]), edge_bytes=np.ones(5)
    )
    # CPU, CPU | GPU, GPU: edges 0->2, 0->3 and 1->2 cross between the same two stages
    assert fan.latency(np.array([CPU, CPU, GPU_RES, GPU_RES])) == pytest.approx(4.0 + 5.0)
    # CPU | GPU | CPU | GPU: the last stage reads from two stages (0->3, 2->3), two packets
    assert fan.latency(np.array([CPU, GPU_RES, CPU, GPU_RES])) == pytest.approx(4.0 + 4 * 5.0)
