"""Partition algorithms against brute force on random problems (no torch), and the plans
they give real models: runnable partitions that reproduce eager outputs."""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import hetero
from hetero.errors import ConfigError, PlanInfeasible
from hetero.partitioner.algorithms import (
    default_algorithms,
    exhaustive,
    exhaustive_pipelines,
    latency,
    throughput,
)
from hetero.partitioner.algorithms.branch import branch_and_bound
from hetero.partitioner.algorithms.problem import INF, Placement, Problem
from hetero.partitioner.split import run_partitions, split

CLUSTERS = "configs/clusters"


def random_problem(seed: int, n: int, d: int, *, chain: bool, memory: bool, stream: bool = True):
    rng = np.random.default_rng(seed)
    placements = []
    for dev in range(d):
        placements.append(Placement(dev))
        if stream and dev > 0:
            placements.append(Placement(dev, "streamed"))
    base = rng.uniform(0.1, 5, size=(n, d))
    params = rng.uniform(0, 10, size=n)
    compute = np.zeros((n, len(placements)))
    for p, pl in enumerate(placements):
        compute[:, p] = base[:, pl.device]
        if pl.weights == "streamed":
            compute[:, p] = np.maximum(compute[:, p], params * rng.uniform(0.1, 0.5))
    off = rng.random(compute.shape) < 0.1  # unsupported ops / pins
    off[:, 0] = False  # device 0 runs everything, like a host CPU
    compute[off] = np.inf
    edges = []
    for v in range(1, n):
        if chain or rng.random() < 0.7:
            edges.append((v - 1, v))
        if not chain:
            edges += [(u, v) for u in range(v - 1) if rng.random() < 0.15]
    lat = rng.uniform(0, 0.3, (d, d))
    bw = rng.uniform(0.2, 2, (d, d))
    cap = np.full(d, 1e9)
    if memory:
        cap = rng.uniform(10, params.sum() + 10, size=d)
        cap[0] = 1e9
    return Problem(
        names=tuple(f"g{i}" for i in range(n)),
        devices=tuple(f"d{k}" for k in range(d)),
        placements=tuple(placements),
        compute=compute,
        edges=np.array(edges, dtype=int).reshape(-1, 2),
        edge_bytes=rng.uniform(0, 3, size=len(edges)),
        link_latency=(lat + lat.T) / 2,
        link_inv_bw=2 / (bw + bw.T),
        param_bytes=params,
        act_bytes=rng.uniform(0, 1, n),
        capacity=cap,
        in_bytes=np.r_[1.0, np.zeros(n - 1)],
        out_bytes=np.r_[np.zeros(n - 1), 1.0],
    )


_FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 12), chain=st.booleans())
def test_two_device_min_cut_equals_exhaustive(seed, n, chain):
    p = random_problem(seed, n, 2, chain=chain, memory=False)
    ex, la = exhaustive(p), latency(p)
    assert p.feasible(la.assign)
    assert la.seconds == pytest.approx(ex.seconds, rel=1e-9, abs=1e-12)


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), chain=st.booleans())
def test_three_devices_within_5_percent(seed, n, chain):
    p = random_problem(seed, n, 3, chain=chain, memory=False)
    ex, la = exhaustive(p), latency(p)
    assert p.feasible(la.assign)
    assert la.seconds <= ex.seconds * 1.05 + 1e-12


# The same 40 problems every run (derandomized), plus the four that a sweep of 4,000 random
# ones (seeds drawn by numpy's default_rng(7); d, n, chain as here) found over 5%; since
# the latency planner's pair cuts and restarts (partitioner/algorithms/latency.py,
# `every_pair`, `_KICKS`) the same sweep finds none over 1% (the worst 0.6%).
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
@given(
    seed=st.integers(0, 2**31),
    d=st.integers(2, 3),
    n=st.integers(1, 9),
    chain=st.booleans(),
)
# found by a random draw in CI: the best lay three changes from a local optimum of single
# moves and two-group trades (partitioner/algorithms/latency.py, _TRIPLE_LIMIT)
@example(seed=4937, d=2, n=4, chain=False)
# 8.7% over: streamed weights' slots overflowed device 1 at every penalty, so no cut tried
# device 2, where the best ran groups 2-7; every start lay six changes or more from it
@example(seed=805319493, d=3, n=8, chain=True)
# 7.5%, 5.7% and 5.2% over: the best lay five or six changes from a local optimum
@example(seed=1382953814, d=3, n=7, chain=False)
@example(seed=155526986, d=3, n=7, chain=True)
@example(seed=962122045, d=3, n=9, chain=False)
def test_memory_limits_hold_and_stay_near_optimal(seed, d, n, chain):
    p = random_problem(seed, n, d, chain=chain, memory=True)
    ex, la = exhaustive(p), latency(p)
    if not np.isfinite(ex.seconds):
        return
    assert p.feasible(la.assign)  # memory and op support
    # a knapsack under the cut, so not exact (see above the test)
    assert la.seconds <= ex.seconds * 1.05 + 1e-12


def hopped_problem(seed: int, n: int, d: int, *, chain: bool, memory: bool = False) -> Problem:
    """random_problem run by an executor whose hop (1 s) dwarfs the links: over Ray, every
    pair of partitions on two devices and each way in and out of the caller pays it, and
    several groups read the caller's inputs and write outputs."""
    p = random_problem(seed, n, d, chain=chain, memory=memory)
    rng = np.random.default_rng(seed + 1)
    reads, writes = rng.random(n) < 0.3, rng.random(n) < 0.3
    reads[0] = writes[-1] = True
    return dataclasses.replace(
        p,
        link_latency=p.link_latency + 1.0 * (1 - np.eye(d)),
        caller_hop=1.0,
        call=np.full(d, 0.05),
        in_bytes=reads.astype(float),
        out_bytes=writes.astype(float),
    )


def per_packet(p: Problem, assign: np.ndarray) -> float:
    """Problem.latency the slow way: partitions are runs of one placement; each pair of them
    on two devices with a value between them is one packet, and so is each way in and out
    of the caller for a partition that reads its inputs or writes outputs."""
    run = np.cumsum(np.r_[0, assign[1:] != assign[:-1]])
    dev = p.place_device[assign]
    t = sum(p.base[i, assign[i]] for i in range(p.n))
    packets = set()
    for (u, v), b in zip(p.edges, p.edge_bytes, strict=True):
        if dev[u] != dev[v]:
            t += b * p.link_inv_bw[dev[u], dev[v]]
            packets.add((run[u], run[v], p.link_latency[dev[u], dev[v]]))
    for i in range(p.n):
        if p.in_bytes[i] > 0:
            packets.add((-1, run[i], p.in_latency[dev[i]]))
        if p.out_bytes[i] > 0:
            packets.add((run[i], -1, p.out_latency[dev[i]]))
    return float(t + sum(lat for _, _, lat in packets))


def per_value(p: Problem, assign: np.ndarray) -> float:
    """What the min-cut minimises: each value and each group's use of the caller's values a
    packet of its own."""
    t = p.unary[np.arange(p.n), assign].sum()
    dev = p.place_device[assign]
    return float(t + sum(p.edge_cost[e, dev[u], dev[v]] for e, (u, v) in enumerate(p.edges)))


def every_assignment(p: Problem):
    return (np.array(a) for a in itertools.product(*(np.flatnonzero(r) for r in p.allowed())))


@_FAST
@given(
    seed=st.integers(0, 2**31),
    d=st.integers(2, 3),
    n=st.integers(1, 6),
    chain=st.booleans(),
    memory=st.booleans(),
)
def test_with_a_hop_exact_searches_match_brute_force_per_packet(seed, d, n, chain, memory):
    p = hopped_problem(seed, n, d, chain=chain, memory=memory)
    every = np.array(list(every_assignment(p)))
    slow = np.array([per_packet(p, a) for a in every])
    assert p.latencies(every) == pytest.approx(slow, rel=1e-9)  # exhaustive's, per row
    some = slice(None, None, max(1, len(every) // 50))
    assert [p.latency(a) for a in every[some]] == pytest.approx(slow[some], rel=1e-9)
    best = min((t for a, t in zip(every, slow, strict=True) if p.feasible(a)), default=INF)
    ex = exhaustive(p)
    assert ex.seconds == pytest.approx(best, rel=1e-9)
    bb = branch_and_bound(p)
    assert bb.proven and bb.value == pytest.approx(best, rel=1e-9)
    if np.isfinite(best):
        assert p.latency(bb.assign) == pytest.approx(best, rel=1e-9)
    pipe, dp = exhaustive_pipelines(p), throughput(p)
    assert dp.seconds == pytest.approx(pipe.seconds, rel=1e-9) or pipe.seconds == dp.seconds


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 7), chain=st.booleans())
def test_with_a_hop_two_device_latency_is_bounded_by_the_per_value_optimum(seed, n, chain):
    """Priced per pair of partitions the min-cut is not exact (a pair's hop is shared by its
    values, the caller's by a partition's groups): the latency algorithm costs at most the
    best assignment priced per value, which is what the cut minimises, and is exact where
    both prices agree (a chain whose first group alone reads and last alone writes)."""
    p = hopped_problem(seed, n, 2, chain=chain)
    ex, la = exhaustive(p), latency(p)
    assert p.feasible(la.assign)
    assert la.seconds >= ex.seconds * (1 - 1e-9)
    assert la.seconds <= min(per_value(p, a) for a in every_assignment(p)) * (1 + 1e-9)
    if chain and p.in_bytes[1:].sum() == 0 and p.out_bytes[:-1].sum() == 0:
        assert la.seconds == pytest.approx(ex.seconds, rel=1e-9)


@_FAST
@given(
    seed=st.integers(0, 2**31),
    d=st.integers(2, 3),
    n=st.integers(1, 12),
    chain=st.booleans(),
    memory=st.booleans(),
)
def test_throughput_dp_matches_exhaustive(seed, d, n, chain, memory):
    p = random_problem(seed, n, d, chain=chain, memory=memory)
    ex, dp = exhaustive_pipelines(p), throughput(p)
    if not np.isfinite(ex.seconds):
        assert not np.isfinite(dp.seconds)
        return
    assert p.feasible(dp.assign) and p.pipeline_valid(dp.assign)
    assert dp.seconds == pytest.approx(ex.seconds, rel=1e-9)


def test_registry_lists_known_algorithms():
    reg = default_algorithms()
    assert reg.names() == ["exhaustive", "latency", "throughput"]
    with pytest.raises(ConfigError, match="known: exhaustive, latency, throughput"):
        reg.get("lateny")


# ---- real models ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_graph(tiny_gpt):
    model, inputs = tiny_gpt
    return model, inputs, hetero.capture(model, inputs)


def _runs_like_eager(graph, plan, model, inputs):
    parts = split(graph, plan.assignment())
    assert len(parts) == len(plan.partitions)
    out = run_partitions(graph, parts, *inputs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs))


@pytest.mark.parametrize(
    "cluster", ["dev-box-npu", "h100-sxm-node", "2gpu-nvlink", "edge-cpu-npu", "a100-80gb-node"]
)
@pytest.mark.parametrize("objective", ["latency", "throughput"])
def test_plans_run_and_match_eager(gpt_graph, cluster, objective):
    model, inputs, graph = gpt_graph
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/{cluster}.yaml")
    plan = hetero.plan(graph, spec, objective)
    assert {n for p in plan.partitions for n in p.nodes} == set(graph.nodes)
    for p in plan.partitions:
        assert p.emulated == spec.device(p.device).emulated
    _runs_like_eager(graph, plan, model, inputs)


def test_exhaustive_plan_matches_latency_on_two_devices(mlp):
    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/dev-box-npu.yaml")
    a = hetero.plan(graph, spec, "latency")
    b = hetero.plan(graph, spec, "latency", algorithm="exhaustive")
    assert a.predicted_ms == pytest.approx(b.predicted_ms, rel=1e-6)
    _runs_like_eager(graph, b, model, inputs)


def test_pins_and_exclusions(gpt_graph):
    model, inputs, graph = gpt_graph
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/h100-sxm-node.yaml")
    plan = hetero.plan(graph, spec, pins={"blocks.0": "node0/cpu"})
    on_cpu = {n for p in plan.partitions if p.device == "node0/cpu" for n in p.nodes}
    assert {n for n in graph.nodes if graph[n].module.startswith("blocks.0")} <= on_cpu
    assert any(r.reason == "pinned to node0/cpu" for r in plan.rejections)
    plan = hetero.plan(graph, spec, exclude=["node0/gpu"])
    assert plan.devices() == ("node0/cpu",)
    assert any(r.reason == "excluded by the user" for r in plan.rejections)
    _runs_like_eager(graph, plan, model, inputs)


def test_op_support_is_respected_and_explained(gpt_graph):
    _, _, graph = gpt_graph
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/edge-cpu-npu.yaml")  # NPU: no float32
    plan = hetero.plan(graph, spec)
    rejected = {(r.node, r.device) for r in plan.rejections}
    for p in plan.partitions:
        for n in p.nodes:
            assert (n, p.device) not in rejected
    assert any("float32" in r.reason and r.device == "edge/npu" for r in plan.rejections)


def test_memory_forces_weight_streaming(gpt_graph):
    model, inputs, graph = gpt_graph
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/h100-sxm-node.yaml")
    small = spec.with_device("node0/gpu", memory=graph.param_bytes * 0.4)
    plan = hetero.plan(graph, small)
    mem = dict(plan.memory)
    assert mem.get("node0/gpu", 0) <= graph.param_bytes * 0.4
    _runs_like_eager(graph, plan, model, inputs)


def test_infeasible_says_which_device_lacks_what(gpt_graph):
    _, _, graph = gpt_graph
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/cpu-2core.yaml")
    tiny = spec.with_device("box/cpu", memory=1000.0)
    with pytest.raises(PlanInfeasible, match=r"box/cpu.*(lacks|memory)"):
        hetero.plan(graph, tiny)
    edge = hetero.Cluster.from_yaml(f"{CLUSTERS}/edge-cpu-npu.yaml")
    with pytest.raises(PlanInfeasible, match="can run on no device"):
        hetero.plan(graph, edge, exclude=["edge/cpu"])


def test_a_wrong_backend_is_refused_at_the_edge_and_an_absent_one_falls_back_below(mlp):
    from hetero.backends.registry import default_registry
    from hetero.partitioner.algorithms import plan as make_plan
    from hetero.partitioner.decisions import BackendAssignment

    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/cpu-2core.yaml")
    with pytest.raises(ConfigError, match=r"backends\.cpu: no backend 'tvmm' \(did you mean 'tvm'"):
        hetero.plan(graph, spec, backends={"cpu": "tvmm"})
    with pytest.raises(ConfigError, match=r"backends\.cpu: triton compiles for gpu devices only"):
        hetero.plan(graph, spec, backends={"cpu": "triton"})
    # Below the edge (a registry that lacks the plug-in it was given): eager, with a note.
    plan = make_plan(
        graph,
        spec,
        backends=BackendAssignment.parse({"cpu": "nosuch"}),
        registry=default_registry(),
    )
    assert {p.backend for p in plan.partitions} == {"eager"}
    assert any("nosuch" in n and "eager" in n for n in plan.notes)


class _Decoder(torch.nn.Module):
    """Four 4 MiB layers run on one token: bandwidth-bound, like decoding."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(1024, 1024) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        return x


@pytest.mark.parametrize(
    ("link_gbs", "tokens", "expect"),
    [(54.6, 256, "streamed"), (12.0, 1, "cpu")],  # prefill on PCIe Gen5; decode on Gen3
)
def test_streaming_beats_cpu_only_on_a_fast_link(link_gbs, tokens, expect):
    from dataclasses import replace

    torch.manual_seed(0)
    model, inputs = _Decoder().eval(), (torch.randn(1, tokens, 1024),)
    graph = hetero.capture(model, inputs)
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/h100-sxm-node.yaml")
    spec = hetero.Cluster(
        spec.name, spec.devices, tuple(replace(l, bandwidth=link_gbs * 1e9) for l in spec.links)
    )
    # two of the four layers, or the double buffer of one, plus a layer's live activations
    # at 256 tokens (its input and its output, 1 MiB each: the planner's liveness peak)
    cap = 2.5 * 4 * 2**20 + 2 * 2**20
    spec = spec.with_device("node0/gpu", memory=cap)
    plan = hetero.plan(graph, spec, groups=graph.coarsen(depth=2))
    layers = [p for p in plan.partitions if any(g.startswith("layers.") for g in p.groups)]
    streamed = [p for p in layers if p.weights == "streamed"]
    if expect == "streamed":
        assert streamed and all(p.device == "node0/gpu" for p in layers)
    else:
        assert not streamed and any(p.device == "node0/cpu" for p in layers)
    assert dict(plan.memory).get("node0/gpu", 0) <= cap
    _runs_like_eager(graph, plan, model, inputs)


def _memory_bound_problem() -> Problem:
    """An embedding (150 B) and three layers (100 B each) under a 300 B GPU: streaming the
    layers costs 5 s each, computing them resident 1 s; the embedding costs about the same
    on either device. The GPU holds the three layers only with the embedding elsewhere."""
    inf = float("inf")
    gpu, gpu_streamed, cpu = Placement(0), Placement(0, "streamed"), Placement(1)
    compute = np.array(
        [[1.0, 1.0, 1.1]] + [[1.0, 5.0, 50.0]] * 3,
    )
    compute[0, 1] = inf  # keep the embedding resident where it runs
    return Problem(
        names=("embed", "l0", "l1", "l2"),
        devices=("gpu", "cpu"),
        placements=(gpu, gpu_streamed, cpu),
        compute=compute,
        edges=np.array([(0, 1), (1, 2), (2, 3)]),
        edge_bytes=np.zeros(3),
        link_latency=np.zeros((2, 2)),
        link_inv_bw=np.zeros((2, 2)),
        param_bytes=np.array([150.0, 100.0, 100.0, 100.0]),
        act_bytes=np.zeros(4),
        capacity=np.array([350.0, 1e9]),
    )


def test_local_search_moves_a_group_off_to_free_memory_for_residents():
    from hetero.partitioner.algorithms.latency import _local_search, _refill

    problem = _memory_bound_problem()
    stuck = np.array([0, 1, 1, 1])  # embedding on the GPU, every layer streamed: 16 s
    assert not problem.overflow(stuck).any()
    # one move alone (the embedding to the CPU) is slower until the layers take its bytes
    moved = np.array([2, 1, 1, 1])
    assert problem.latency(moved) > problem.latency(stuck)
    assert list(_refill(problem, moved, problem.allowed())) == [2, 0, 0, 0]
    best = _local_search(problem, stuck, problem.allowed(), trades=False)
    assert list(best) == [2, 0, 0, 0] and problem.latency(best) == pytest.approx(4.1)


def test_pipeline_stages_price_each_partition_call_once(tiny_gpt):
    # what the planner balances is what the plan predicts per stage: the first stage pays
    # its own partition call (and the executor's work around it), and handing the outputs
    # back to the caller starts no partition there
    from hetero.backends.registry import default_registry
    from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.decisions import BackendAssignment, Objective
    from hetero.partitioner.reprice import assignment_of, pricing

    spec = hetero.Cluster.from_yaml("configs/clusters/dev-box-npu.yaml")
    model, x = tiny_gpt
    graph = hetero.capture(model, x)
    stage = RuntimeProfile("local", stage_overhead=1e-3, hop_overhead=0.0)
    cm = CostModel(CalibrationProfile(spec.name, runtime=(stage,)), executor="local")
    backends = BackendAssignment.everywhere("eager")
    obj = Objective.THROUGHPUT
    priced = pricing(
        graph, spec, obj, registry=default_registry(), cost_model=cm, backends=backends
    )
    plan = hetero.plan(graph, spec, obj, backends=backends, cost_model=cm, pins={"head": "npu"})
    assert len(plan.partitions) == 2
    problem = priced.problem
    times = problem.stage_times(assignment_of(plan, priced))
    incoming = {t.dst: t.predicted_ms for t in plan.transfers if t.dst >= 0}
    back = sum(t.predicted_ms for t in plan.transfers if t.dst < 0)
    first, last = plan.partitions
    assert 1e3 * times[0] == pytest.approx(first.predicted_ms + incoming.get(0, 0.0), rel=1e-6)
    want = last.predicted_ms + incoming[1] + back
    assert 1e3 * times[1] == pytest.approx(want, rel=1e-6)


def test_priced_once_keeps_devices_with_their_own_corrections_apart(mlp):
    # two CPUs of one spec price alike, until feedback corrects one of them by name
    from hetero.cluster.profile import CalibrationProfile, Correction
    from hetero.cluster.spec import DeviceSpec
    from hetero.partitioner.algorithms.pricing import PricedOnce
    from hetero.partitioner.cost import CostModel

    a = DeviceSpec(
        name="h/a", kind="cpu", host="h", peak_flops=(("float32", 1e11),), mem_bandwidth=1e10
    )
    b = DeviceSpec(**{**a.__dict__, "name": "h/b"})
    model, inputs = mlp
    graph = hetero.capture(model, inputs)
    g = graph.coarsen(depth=0).groups[0]
    ops = [graph[n] for n in g.nodes]
    slow = CalibrationProfile("c", corrections=(Correction("h/a", "eager", "*", 3.0),))
    cm = CostModel(slow)
    priced = PricedOnce(cm)
    ta = priced.group_time(g, ops, a, backend="eager")
    tb = priced.group_time(g, ops, b, backend="eager")
    assert ta == pytest.approx(cm.group_time(g, ops, a, backend="eager"))
    assert tb == pytest.approx(cm.group_time(g, ops, b, backend="eager"))
    assert ta == pytest.approx(3 * tb)


@torch.library.custom_op("hetero_plan_test::scaled", mutates_args=())
def _scaled(x: torch.Tensor) -> torch.Tensor:
    return x * 3.0


@_scaled.register_fake
def _(x):
    return torch.empty_like(x)


class _LibraryOpMLP(torch.nn.Module):
    """An MLP calling a library's own operator, which no compiler converts (transformers'
    Mixtral calls `transformers::grouped_mm_fallback`)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 16), torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.ops.hetero_plan_test.scaled(self.a(x)))


def test_an_op_the_kinds_backend_cannot_run_plans_that_kind_with_eager_unless_pinned():
    model, x = _LibraryOpMLP().eval(), torch.randn(4, 16)
    graph = hetero.capture(model, (x,))
    spec = hetero.Cluster.from_yaml(f"{CLUSTERS}/dev-box-npu.yaml")
    plan = hetero.plan(graph, spec)  # cpu: tvm, which has no converter for the op
    note = next(n for n in plan.notes if "cannot run every op" in n)
    assert "hetero_plan_test.scaled" in note and "planned with eager" in note
    runs = [p for p in plan.partitions if any("scaled" in n for n in p.nodes)]
    assert runs and all(p.device == "local/cpu" and p.backend == "eager" for p in runs)
    _runs_like_eager(graph, plan, model, (x,))
    with pytest.raises(PlanInfeasible, match="can run on no device"):
        hetero.plan(graph, spec, backends={"cpu": "tvm"})  # named: refused, as asked
