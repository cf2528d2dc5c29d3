"""Split and streamed layers measured slower than priced: the excess per hand-off, or per
streamed call, joins the cost model."""

from __future__ import annotations

import pytest

from hetero.calibration.generation import split_feedback, stream_feedback, with_split_handoff
from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
from hetero.partitioner.cost import SPLIT_CPU_PRIOR, CostModel
from hetero.partitioner.decisions import Objective
from hetero.partitioner.plan import Plan, PlannedPartition


def _plan(*parts: PlannedPartition) -> Plan:
    return Plan(model="m", cluster="c", objective=Objective.LATENCY, algorithm="latency",
                partitions=parts, transfers=(), predicted_ms=0.0)  # fmt: skip


# The fits' arithmetic from a machine whose runs measured the split terms at zero (the
# default prices split CPU rows at SPLIT_CPU_PRIOR before any run: the test below).
_NO_PRIOR = CostModel(
    profile=CalibrationProfile(cluster="c", runtime=(RuntimeProfile("local", 0.0, 0.0),))
)


def _split(
    i: int, predicted: float, host: float, handoffs: int = 4, cpu: float = 0.0
) -> PlannedPartition:
    return PlannedPartition(index=i, nodes=(), groups=(f"layers.{i}",), device="gpu",
                            backend="inductor", weights="split", predicted_ms=predicted,
                            host_ms=host, handoffs=handoffs, cpu_ms=cpu)  # fmt: skip


def test_host_bound_split_layers_price_their_hand_offs_higher():
    plan = _plan(_split(0, 4.8, 4.0), _split(1, 4.8, 4.0), _split(2, 4.8, 4.0))
    fb = split_feedback(plan, {0: 6.8, 1: 6.4, 2: 7.2}, _NO_PRIOR, "c")
    assert fb is not None and fb.partitions == 3
    assert fb.extra_s == pytest.approx((6.8 - 4.0) / 4 / 1e3)
    assert fb.cost_model.split_handoff() == pytest.approx(fb.extra_s)
    assert "split hand-offs measured 0.700 ms" in fb.note()
    # a second round adds to the first
    again = with_split_handoff(fb.cost_model, "c", 1e-4)
    assert again.split_handoff() == pytest.approx(fb.extra_s + 1e-4)


@pytest.mark.parametrize(("handoff_ms", "cpu_slower"), [(0.5, 0.9), (0.0, 1.0), (1.2, 0.0)])
def test_split_partitions_of_two_shapes_tell_slow_cpu_rows_from_hand_off_work(
    handoff_ms: float, cpu_slower: float
):
    """Layers with one hand-off and 4 ms of CPU rows each, a LM head with one hand-off and
    1.5 ms: their excesses are one line, so both terms are recovered (run 26's case: the
    LM head, with no down projection, also ran ~1.9x its price)."""
    parts, measured = [], {}
    for i in range(6):
        cpu = 1.5 if i == 5 else 4.0
        parts.append(_split(i, 5.0, 5.0, handoffs=1, cpu=cpu))
        measured[i] = 5.0 + handoff_ms + cpu_slower * cpu + (0.05 if i == 2 else 0.0)
    fb = split_feedback(_plan(*parts), measured, _NO_PRIOR, "c")
    assert fb is not None and fb.partitions == 6
    assert 1e3 * fb.extra_s == pytest.approx(handoff_ms, abs=0.02)
    assert fb.cpu_extra == pytest.approx(cpu_slower, abs=0.02)
    assert fb.cost_model.split_cpu() == pytest.approx(fb.cpu_extra)
    assert fb.cost_model.split_handoff() == pytest.approx(fb.extra_s)
    assert ("CPU rows" in fb.note()) == (cpu_slower > 0)


def test_split_partitions_all_of_one_shape_charge_their_hand_offs():
    """25 layers alike are one equation: the excess stays on the hand-offs (no CPU term)."""
    plan = _plan(*(_split(i, 5.0, 5.0, handoffs=1, cpu=4.0) for i in range(4)))
    fb = split_feedback(plan, dict.fromkeys(range(4), 8.0), _NO_PRIOR, "c")
    assert fb is not None and fb.cpu_extra == 0.0
    assert 1e3 * fb.extra_s == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("cpu_slower", "handoff_ms"), [(0.2, 0.0), (0.0, 0.5), (0.25, 0.3), (-0.1, 0.0)]
)
def test_timed_hand_offs_split_an_overrun_between_slow_cpu_rows_and_hand_off_work(
    cpu_slower: float, handoff_ms: float
):
    """Layers all alike, CPU-bound (host path = price), their hand-offs timed: the spans say
    how much slower the CPU's rows ran than calibrated, and the rest of the overrun is the
    hand-offs' (run 34's Qwen2-7B: a fit over one kind of layer had given it all to the
    hand-offs). A CPU faster than calibrated leaves the CPU term at zero."""
    cpu, price = 4.0, 4.4
    parts = [_split(i, price, price, handoffs=1, cpu=cpu) for i in range(5)]
    measured = {i: price + max(0.0, cpu_slower) * cpu + handoff_ms for i in range(5)}
    spans = {i: cpu * (1 + cpu_slower) + (0.02 if i == 3 else 0.0) for i in range(5)}
    fb = split_feedback(_plan(*parts), measured, _NO_PRIOR, "c", cpu_rows_ms=spans)
    if cpu_slower <= 0 and handoff_ms == 0:
        assert fb is None
        return
    assert fb is not None and fb.cpu_timed and fb.partitions == 5
    assert fb.cpu_extra == pytest.approx(max(0.0, cpu_slower), abs=2e-3)
    assert 1e3 * fb.extra_s == pytest.approx(handoff_ms, abs=5e-3)
    assert fb.cost_model.split_cpu() == pytest.approx(max(0.0, cpu_slower), abs=2e-3)
    assert ("hand-offs timed" in fb.note()) == (cpu_slower > 0)


def test_split_rows_are_priced_at_the_prior_until_a_timed_round_moves_them_either_way():
    """Before any run a split layer's CPU rows cost SPLIT_CPU_PRIOR more than calibrated (every
    GPU host measured ran them slower inside a step); timed spans replace it, down as well."""
    assert CostModel().split_cpu() == SPLIT_CPU_PRIOR
    parts = [
        _split(i, 4.4 + SPLIT_CPU_PRIOR * 4.0, 4.4 + SPLIT_CPU_PRIOR * 4.0, 1, 4.0)
        for i in range(3)
    ]
    measured = dict.fromkeys(range(3), 4.8)
    fb = split_feedback(
        _plan(*parts), measured, CostModel(), "c", cpu_rows_ms=dict.fromkeys(range(3), 4.4)
    )
    assert fb is not None and fb.cost_model.split_cpu() == pytest.approx(0.1)
    assert "split CPU rows +10% against calibrated (their hand-offs timed; priced +30%" in fb.note()
    assert fb.cpu_extra == pytest.approx(0.1 - SPLIT_CPU_PRIOR)


def test_timed_terms_pool_partitions_by_their_size():
    """Run 34's round: 24 split layers 10% over their price, their rows' spans as much over
    the calibrated time, beside one split layer after a CPU layer that ran 1.8x its price. Each
    partition one point, the small one set half of both terms (CPU +38%, hand-offs +0.59
    ms), and the layers were priced 44% over what they had just measured; pooled, the run of
    layers decides."""
    big = _split(0, 83.0, 81.0, handoffs=24, cpu=74.0)
    small = _split(1, 3.39, 3.37, handoffs=1, cpu=3.1)
    measured = {0: 91.3, 1: 5.98}
    spans = {0: 74.0 * 1.1, 1: 3.1 * 1.6}
    fb = split_feedback(_plan(big, small), measured, _NO_PRIOR, "c", cpu_rows_ms=spans)
    assert fb is not None and fb.cpu_timed
    assert fb.cpu_extra == pytest.approx((74.0 * 1.1 + 3.1 * 1.6) / 77.1 - 1)
    assert 1e3 * fb.extra_s < 0.1  # the small layer's 2 ms over 25 hand-offs
    repriced = 81.0 + fb.cpu_extra * 74.0 + 24 * 1e3 * fb.extra_s
    assert repriced == pytest.approx(91.3, rel=0.06)  # the layers as they measured


def test_timed_hand_off_spans_reach_the_feedback_as_a_partitions_median_summed_over_pieces():
    """The runtime's records carry each split stage's hand-off spans; the snapshot keeps their
    median and a partition's pieces add up (a stage without them stays untimed)."""
    from hetero.interfaces.feedback import measured_partitions
    from hetero.runtime.metrics import RunMetrics, StageRecord

    class _Stage:
        def __init__(self, index: int, plan_index: int) -> None:
            self.index, self.plan_index = index, plan_index

    stages = [_Stage(0, 0), _Stage(1, 0), _Stage(2, 1)]
    metrics = RunMetrics(stages=stages)
    for run in range(4):  # the first run of each stage is cold: not in the medians
        metrics.record(StageRecord(0, 5.0, 0, (), (), 5.0, cpu_rows_ms=4.0 + run))
        metrics.record(StageRecord(1, 5.0, 0, (), (), 5.0, cpu_rows_ms=2.0))
        metrics.record(StageRecord(2, 1.0, 0, (), (), 1.0))
    runs = measured_partitions(stages, metrics.snapshot())
    assert runs[0].cpu_rows_ms == pytest.approx(6.0 + 2.0)
    assert runs[1].cpu_rows_ms is None


def test_a_cpu_term_never_goes_below_zero():
    """Layers faster than priced with a CPU term in force lower it to zero, not past it; the
    hand-offs refit what the floor leaves."""
    from hetero.calibration.generation import _with_runtime

    priced = _with_runtime(_NO_PRIOR, "c", split_cpu=0.2)
    parts = [_split(i, 6.0, 6.0, handoffs=1, cpu=1.5 if i else 4.0) for i in range(3)]
    fb = split_feedback(_plan(*parts), {0: 1.0, 1: 4.0, 2: 4.0}, priced, "c")
    assert fb is not None
    assert fb.cost_model.split_cpu() == 0.0
    assert fb.cost_model.split_handoff() == 0.0


def test_split_layers_that_ran_as_priced_change_nothing():
    plan = _plan(_split(0, 4.8, 4.0), _split(1, 4.8, 4.0))
    assert split_feedback(plan, {0: 4.9, 1: 4.7}, _NO_PRIOR, "c") is None
    assert split_feedback(plan, {}, _NO_PRIOR, "c") is None


def test_a_higher_hand_off_cost_moves_a_split_toward_the_gpu():
    """What the feedback is for: priced with the measured hand-off cost, a split layer's
    best share puts more rows on the GPU (its host path got longer). Layers of 50 MB (the
    planning tests' capture, shared: its first layer is the one priced)."""
    from llm_models import captured_big_llama

    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.gpu_cpu_split import split_cost

    lm = captured_big_llama()
    cluster = ClusterSpec.from_yaml("configs/clusters/h200-sxm-node.yaml")
    group = next(g for g in lm.decode.coarsen(depth=3).groups if g.name == "model.model.layers.0")
    ops = [lm.decode[n] for n in group.nodes]

    def fraction(cm: CostModel) -> float:
        cost = split_cost(lm.decode, group, ops, cluster.device("node0/gpu"),
                          cluster.device("node0/cpu"), cluster, cm, gpu_backend="inductor",
                          cpu_backend="eager")  # fmt: skip
        assert cost is not None
        return cost.fraction

    base = CostModel()
    assert fraction(with_split_handoff(base, cluster.name, 2e-4)) > fraction(base)
    # CPU rows measured slower than calibrated: more of them go to the GPU too
    from hetero.calibration.generation import _with_runtime

    assert fraction(_with_runtime(base, cluster.name, split_cpu=1.0)) > fraction(base)


def _streamed(i: int, predicted: float, groups: int = 1) -> PlannedPartition:
    return PlannedPartition(index=i, nodes=(), groups=tuple(f"layers.{i}.{k}" for k in range(groups)),
                            device="gpu", backend="inductor", weights="streamed",
                            predicted_ms=predicted)  # fmt: skip


def test_streamed_layers_with_unpriced_host_work_price_their_calls_higher():
    """Run 13's shape: each streamed layer's call took 1.5 ms of host time, priced 0.18."""
    plan = _plan(_streamed(0, 0.18), _streamed(1, 0.18), _streamed(2, 0.36, groups=2),
                 _split(3, 4.8, 4.0))  # fmt: skip
    fb = stream_feedback(plan, {0: 1.5, 1: 1.6, 2: 3.0, 3: 4.8}, CostModel(), "c")
    assert fb is not None and fb.partitions == 3
    assert fb.extra_s == pytest.approx((1.5 - 1.05 * 0.18) / 1e3)  # the median call
    assert fb.cost_model.stream_call() == pytest.approx(fb.extra_s)
    assert fb.cost_model.split_handoff() == 0.0  # the split layer ran as priced: untouched
    assert "streamed layers' calls measured" in fb.note()
    assert stream_feedback(plan, {0: 0.18, 1: 0.17, 2: 0.3}, CostModel(), "c") is None


def test_a_higher_streamed_call_cost_is_priced_into_every_streamed_group():
    """What the feedback is for: the re-plan prices each streamed group's call with it. Four
    layers (the planning tests' capture, shared), every one streamed."""
    from llm_models import captured_wide_llama

    from hetero.backends.registry import default_registry
    from hetero.calibration.generation import _with_runtime
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.generation import plan_generation

    lm = captured_wide_llama()
    cluster = ClusterSpec.from_yaml("configs/clusters/h200-sxm-node.yaml")
    cluster = cluster.with_device("node0/gpu", memory=int(lm.decode.param_bytes * 0.9))
    forced = {f"model.model.layers.{i}": "streamed" for i in range(4)}

    def step_ms(cm: CostModel) -> float:
        gp = plan_generation(lm, cluster, registry=default_registry(), cost_model=cm,
                             decode_placements=forced)  # fmt: skip
        return gp.predicted_decode_ms

    base = CostModel()
    slower = _with_runtime(base, cluster.name, stream_call=1e-3)
    assert step_ms(slower) == pytest.approx(step_ms(base) + 4 * 1.0, rel=0.05, abs=0.5)


# ---- both ways: faster than priced lowers the host terms, never below zero -------------------
def test_split_layers_faster_than_priced_lower_the_hand_off_term_down_to_zero():
    plan = _plan(_split(0, 4.8, 4.0), _split(1, 4.8, 4.0))
    priced = with_split_handoff(CostModel(), "c", 1e-3)  # 1 ms per hand-off in force
    fb = split_feedback(plan, {0: 3.0, 1: 3.0}, priced, "c")
    assert fb is not None and fb.extra_s == pytest.approx((3.0 * 1.05 - 4.8) / 4 / 1e3)
    assert fb.cost_model.split_handoff() == pytest.approx(1e-3 + fb.extra_s)
    assert "below their price" in fb.note()
    # far faster still: the term goes to zero, not below (the calibrated copies stay)
    floored = split_feedback(plan, {0: 0.5, 1: 0.5}, priced, "c")
    assert floored is not None and floored.cost_model.split_handoff() == 0.0
    assert floored.extra_s == pytest.approx(-1e-3)
    # with no term to take from, nothing changes
    assert split_feedback(plan, {0: 0.5, 1: 0.5}, _NO_PRIOR, "c") is None


def test_streamed_calls_faster_than_priced_lower_their_term():
    from hetero.calibration.generation import _with_runtime

    plan = _plan(_streamed(0, 2.0), _streamed(1, 2.0))
    priced = _with_runtime(CostModel(), "c", stream_call=1.5e-3)
    fb = stream_feedback(plan, {0: 1.0, 1: 1.0}, priced, "c")
    assert fb is not None and fb.extra_s == pytest.approx((1.0 * 1.05 - 2.0) / 1e3)
    assert fb.cost_model.stream_call() == pytest.approx(1.5e-3 + fb.extra_s)
    assert stream_feedback(plan, {0: 1.95, 1: 2.05}, priced, "c") is None  # the 5% band


# ---- resident partitions: fitted as a forward's, carried into the re-plan --------------------
CPU2 = "configs/clusters/cpu-2core.yaml"
H100 = "configs/clusters/h100-sxm-node.yaml"


def _halved_cpu(cluster) -> CostModel:
    """A deliberately wrong profile: every CPU cost (its groups and its call) at half."""
    from hetero.cluster.profile import ALL_CLASSES, CALL, CalibrationProfile, Correction

    cpu = next(d for d in cluster.devices if d.kind == "cpu")
    halves = tuple(Correction(cpu.name, "eager", k, 0.5) for k in (ALL_CLASSES, CALL))
    return CostModel(profile=CalibrationProfile(cluster=cluster.name, corrections=halves))


def _measured(ms: dict[int, float]) -> dict:
    from hetero.calibration.feedback import Measured

    return {k: Measured(runs=16, runner_ms=v, stage_ms=v) for k, v in ms.items()}


@pytest.mark.parametrize("wrong", ["cpu costs halved", "cpu measured at half"])
def test_a_resident_partition_off_its_price_is_priced_as_measured_after_one_round(
    tiny_llama_lm, wrong
):
    """Both ways: a profile with the CPU's costs halved (measured twice its price), and a CPU
    measured at half its price. One round's fold prices the same partition as measured,
    and the re-plan is priced with it."""
    from hetero.backends.registry import default_registry
    from hetero.calibration.generation import resident_feedback
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.generation import decode_pricing, plan_generation
    from hetero.partitioner.reprice import reprice

    cluster = ClusterSpec.from_yaml(CPU2)
    reg = default_registry()
    truth = plan_generation(tiny_llama_lm, cluster, registry=reg, cost_model=CostModel())
    cm = _halved_cpu(cluster) if wrong == "cpu costs halved" else CostModel()
    cm = with_split_handoff(cm, cluster.name, 1e-3)  # a term the fit must keep
    first = plan_generation(tiny_llama_lm, cluster, registry=reg, cost_model=cm).decode
    (p,) = first.partitions
    got = truth.decode.predicted_ms if wrong == "cpu costs halved" else p.predicted_ms / 2
    assert abs(p.predicted_ms - got) / got > 0.4  # off before

    priced = decode_pricing(tiny_llama_lm, cluster, registry=reg, cost_model=cm)
    fb = resident_feedback(first, priced, _measured({p.index: got}), cm, min_ms=0.25)
    assert fb is not None and fb.folded == 1 and "box/cpu" in fb.note()
    assert fb.cost_model.split_handoff() == pytest.approx(1e-3)
    after = reprice(first, decode_pricing(tiny_llama_lm, cluster, registry=reg,
                                          cost_model=fb.cost_model))  # fmt: skip
    assert after.partitions[0].predicted_ms == pytest.approx(got, rel=0.05)
    again = plan_generation(tiny_llama_lm, cluster, registry=reg, cost_model=fb.cost_model)
    assert again.predicted_decode_ms == pytest.approx(got, rel=0.05)


class _FakeDecode:
    """A decode executor's measurements without running anything: per plan partition, the
    warm runs' median (stage index = plan index)."""

    def __init__(self, ms: dict[int, float]) -> None:
        from hetero.runtime.metrics import MetricsSnapshot, StageStats

        self.stages = ()
        snap = MetricsSnapshot(tuple(StageStats(k, 16, v, v) for k, v in ms.items()), (), 2)
        self.metrics = type("M", (), {"snapshot": lambda self, *a: snap})()


class _FakeGeneration:
    def __init__(self, decode_ms: dict[int, float], token_ms: float) -> None:
        from hetero.partitioner.phases import Phase

        self.executors = {Phase.DECODE: _FakeDecode(decode_ms)}
        self.last = {"decode_ms_per_token": token_ms}
        self._closed = False
        self.thread_choice = None  # no host CPU team: nothing to choose

    def generate(self, *a, **kw):
        return None

    def settle(self) -> None:
        pass

    def program_choices(self) -> tuple:
        return ()  # no host CPU programs measured

    def measured(self, phase):
        executor = self.executors[phase]
        return executor.stages, executor.metrics.snapshot()

    def shutdown(self) -> None:  # as LocalGeneration's: its executors (and runners) dropped
        self._closed = True
        self.executors.clear()


def _h100_plan(lm):
    """(the H100 node, the planning settings a round re-plans with, the generation's plan at
    the default prices)."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.generation import GENERATION_BACKENDS, plan_generation

    cluster = ClusterSpec.from_yaml(H100)
    kw = dict(registry=default_registry(), backends=GENERATION_BACKENDS, pins=None, exclude=(),
              decode_placements=None)  # fmt: skip
    return cluster, kw, plan_generation(lm, cluster, cost_model=CostModel(), **kw)


def test_a_feedback_round_replans_away_from_a_gpu_measured_slow(tiny_llama_lm):
    """The round itself (interfaces/generate.py), on measurements injected in place of a
    run: the GPU's resident partition measured 40x its price. Its corrected price is what
    was measured, the report says so per partition, and the re-plan, priced with it,
    moves the layers to the host CPU and is rebuilt."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import CompiledLM, _feedback_round
    from hetero.partitioner.algorithms.generation import GENERATION_BACKENDS, plan_generation

    cluster = ClusterSpec.from_yaml(H100)
    reg = default_registry()
    kw = dict(registry=reg, backends=GENERATION_BACKENDS, pins=None, exclude=(),
              decode_placements=None)  # fmt: skip
    plan = plan_generation(tiny_llama_lm, cluster, cost_model=CostModel(), **kw)
    (p,) = plan.decode.partitions
    assert p.device == "node0/gpu"
    slow = 40 * p.predicted_ms
    compiled = CompiledLM(tiny_llama_lm, plan, cluster, _FakeGeneration({0: slow}, slow))
    built = []

    def rebuild(gp):
        built.append(gp)
        return CompiledLM(tiny_llama_lm, gp, cluster, _FakeGeneration({}, 0.0))

    out = _feedback_round(compiled, CostModel(), rebuild, kw)
    fb = out.feedback
    assert fb["replanned"] and built and out.plan is built[0]
    assert {q.device for q in built[0].decode.partitions} == {"node0/cpu"}
    assert "re-planned" in built[0].notes[-1] and "folded" in fb["why"]
    (row,) = fb["partitions"]
    assert row["measured_ms"] == pytest.approx(slow)
    assert row["predicted_ms"] == pytest.approx(p.predicted_ms)
    assert row["after_ms"] == pytest.approx(slow, rel=0.05) and not row["in_replan"]
    assert fb["median_error_before"] == pytest.approx(1 - 1 / 40)
    assert fb["median_error_after"] < 0.05
    assert fb["replan_predicted_ms"] < slow


def test_a_plan_kept_after_the_round_carries_the_corrected_prices(tiny_llama_lm):
    """One CPU, nowhere else to go: the round keeps the plan, and the plan it keeps prices
    its partition as measured (its next comparison starts there), saying so in its notes."""
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.generate import CompiledLM, _feedback_round
    from hetero.partitioner.algorithms.generation import GENERATION_BACKENDS, plan_generation

    cluster = ClusterSpec.from_yaml(CPU2)
    kw = dict(registry=default_registry(), backends=GENERATION_BACKENDS, pins=None, exclude=(),
              decode_placements=None)  # fmt: skip
    plan = plan_generation(tiny_llama_lm, cluster, cost_model=CostModel(), **kw)
    got = 3 * plan.decode.partitions[0].predicted_ms
    compiled = CompiledLM(tiny_llama_lm, plan, cluster, _FakeGeneration({0: got}, got))
    out = _feedback_round(compiled, CostModel(), lambda gp: pytest.fail("rebuilt"), kw)
    assert out is compiled and not out.feedback["replanned"]
    assert out.plan.decode.partitions[0].predicted_ms == pytest.approx(got, rel=0.05)
    assert out.plan.predicted_decode_ms == pytest.approx(got, rel=0.05)
    assert "median partition error: 67% priced before, 0% after" in out.plan.notes[-1]


def _two_speeds(lm, cluster, gpu_ms: float, cpu_ms: float, never: str = ""):
    """(a fake build whose step takes `gpu_ms` where any decode partition is on the GPU,
    else `cpu_ms`; a rebuild that records each plan it builds; the plans built). `never`:
    weights no built plan may have."""
    from hetero.interfaces.generate import CompiledLM

    def fake(gp) -> CompiledLM:
        parts = gp.decode.partitions
        assert not never or parts[0].weights != never, f"a plan with {never} layers was built"
        total = gpu_ms if any(q.device == "node0/gpu" for q in parts) else cpu_ms
        each = {q.index: total / len(parts) for q in parts}
        return CompiledLM(lm, gp, cluster, _FakeGeneration(each, total))

    built: list = []

    def rebuild(gp):
        built.append(gp)
        return fake(gp)

    return fake, rebuild, built


def test_rounds_go_back_to_the_plan_measured_fastest(tiny_llama_lm):
    """The re-plan runs slower than the plan it replaced: the next round measures it, and the
    rounds end on the plan measured fastest (rebuilt from its measurement, not a price),
    with every round in the report."""
    from hetero.interfaces.generate import _feedback_rounds

    cluster, kw, plan = _h100_plan(tiny_llama_lm)
    (p,) = plan.decode.partitions
    gpu_ms = 40 * p.predicted_ms  # the GPU plan: slow, but the CPU plan is slower still
    cpu_ms = 3 * gpu_ms

    fake, rebuild, built = _two_speeds(tiny_llama_lm, cluster, gpu_ms, cpu_ms)
    out = _feedback_rounds(fake(plan), CostModel(), rebuild, kw)
    devices = [{q.device for q in b.decode.partitions} for b in built]
    assert devices[0] == {"node0/cpu"}  # round 1: priced faster on the CPU
    assert devices[-1] == {"node0/gpu"}  # back to the faster one, and kept there
    assert {q.device for q in out.plan.decode.partitions} == {"node0/gpu"}
    rounds = out.feedback["rounds"]
    assert [r["measured_ms_per_token"] for r in rounds[:2]] == pytest.approx([gpu_ms, cpu_ms])
    assert rounds[0]["replanned"] and rounds[1]["replanned"]
    assert "ms per token measured against" in built[-1].notes[-1]
    assert out.feedback["partitions"][0]["measured_ms"] == pytest.approx(gpu_ms)  # round 1's
    assert len(rounds) <= 3


def test_a_budget_makes_the_round_that_would_pass_it_the_last(tiny_llama_lm):
    """The rounds of test_rounds_go_back_to_the_plan_measured_fastest take three rounds
    (re-plan, go back, keep); with a budget the second round would pass, it is the last: it
    measures the re-plan, goes back to the plan measured faster, and says why it stopped."""
    from hetero.interfaces.generate import _feedback_rounds
    from hetero.partitioner.decisions import FeedbackRounds

    cluster, kw, plan = _h100_plan(tiny_llama_lm)
    (p,) = plan.decode.partitions
    gpu_ms = 40 * p.predicted_ms
    fake, rebuild, built = _two_speeds(tiny_llama_lm, cluster, gpu_ms, 3 * gpu_ms)
    ticks = iter(range(0, 1000, 5))  # every reading of the clock is 5 s later

    def rounds(limits):
        built.clear()
        out = _feedback_rounds(fake(plan), CostModel(), rebuild, kw, limits, lambda: next(ticks))
        return out.feedback["rounds"], out

    unbounded, _ = rounds(FeedbackRounds())
    assert len(unbounded) == 3
    bounded, out = rounds(FeedbackRounds(budget_s=12))  # round 2 starts 15 s in, 5 s long
    assert len(bounded) == 2 and "12 s budget" in bounded[1]["why"]
    assert [{q.device for q in b.decode.partitions} for b in built] == [
        {"node0/cpu"},
        {"node0/gpu"},
    ]
    assert {q.device for q in out.plan.decode.partitions} == {"node0/gpu"}  # measured faster


@pytest.mark.parametrize(
    "kw, what", [({"rounds": 0}, "1 or more rounds"), ({"budget_s": 0}, "seconds above 0")]
)
def test_feedback_rounds_out_of_range_say_what_to_give(kw, what):
    from hetero.errors import ConfigError
    from hetero.partitioner.decisions import FeedbackRounds

    with pytest.raises(ConfigError, match=what):
        FeedbackRounds(**kw)


def test_the_last_round_rebuilds_only_a_plan_measured_faster(tiny_llama_lm):
    """One round allowed: it is the last, so a re-plan that was never measured is not built
    however fast it is priced; with no plan measured before, the running one is kept."""
    from hetero.interfaces.generate import CompiledLM, _feedback_rounds
    from hetero.partitioner.decisions import FeedbackRounds

    cluster, kw, plan = _h100_plan(tiny_llama_lm)
    (p,) = plan.decode.partitions
    slow = 40 * p.predicted_ms
    compiled = CompiledLM(tiny_llama_lm, plan, cluster, _FakeGeneration({0: slow}, slow))
    out = _feedback_rounds(
        compiled, CostModel(), lambda gp: pytest.fail("rebuilt"), kw, FeedbackRounds(rounds=1)
    )
    assert out is compiled and not out.feedback["replanned"]
    assert "no plan measured before" in out.feedback["why"]


def test_a_re_plan_priced_slower_than_a_plan_measured_goes_back_to_that_plan(
    tiny_llama_lm, monkeypatch
):
    """Round 1 re-plans from the GPU plan to the CPU, which measures slower; round 2's
    re-plan is a third plan priced between the two measurements. A price that has been wrong
    does not beat a measurement: round 2 goes back to the GPU plan, and the third is never
    built."""
    import dataclasses

    import hetero.interfaces.generate as generate
    from hetero.interfaces.generate import _feedback_rounds
    from hetero.partitioner.algorithms.generation import plan_generation

    cluster, kw, plan = _h100_plan(tiny_llama_lm)
    (p,) = plan.decode.partitions
    gpu_ms = 40 * p.predicted_ms
    cpu_ms = 3 * gpu_ms
    third_ms = 2 * gpu_ms  # between the two measurements, well under the CPU plan's
    third = dataclasses.replace(
        plan,
        decode=dataclasses.replace(
            plan.decode,
            partitions=tuple(
                dataclasses.replace(q, weights="streamed") for q in plan.decode.partitions
            ),
            predicted_ms=third_ms,
        ),
    )
    calls = []

    def planned(*a, **k):
        calls.append(1)
        return plan_generation(*a, **k) if len(calls) == 1 else third

    monkeypatch.setattr(generate, "plan_generation", planned)

    fake, rebuild, built = _two_speeds(tiny_llama_lm, cluster, gpu_ms, cpu_ms, never="streamed")
    out = _feedback_rounds(fake(plan), CostModel(), rebuild, kw)
    assert [{q.device for q in b.decode.partitions} for b in built] == [
        {"node0/cpu"},
        {"node0/gpu"},
    ]
    assert "back to the plan measured fastest" in out.feedback["rounds"][1]["why"]
    assert {q.device for q in out.plan.decode.partitions} == {"node0/gpu"}


def test_a_rebuild_binds_the_next_plan_with_nothing_of_the_last_one_alive(tiny_llama_lm):
    """The plan being replaced is shut down before the next one binds, and no frame of the
    round still holds its decode executor (through it, every runner's weights): an H200
    compile that rebuilt with one held peaked at 7.65 GB under a 4 GiB cap (run 18)."""
    import gc
    import weakref

    from hetero.interfaces.generate import CompiledLM, _feedback_round
    from hetero.partitioner.phases import Phase

    cluster, kw, plan = _h100_plan(tiny_llama_lm)
    slow = 40 * plan.decode.partitions[0].predicted_ms
    compiled = CompiledLM(tiny_llama_lm, plan, cluster, _FakeGeneration({0: slow}, slow))
    old = weakref.ref(compiled.generation.executors[Phase.DECODE])
    alive = []

    def rebuild(gp):
        gc.collect()
        alive.append(old() is not None)
        return CompiledLM(tiny_llama_lm, gp, cluster, _FakeGeneration({}, 0.0))

    out = _feedback_round(compiled, CostModel(), rebuild, kw)
    assert out.feedback["replanned"] and alive == [False]
