"""Feedback calibration: run records from a plan, the fit of corrections and runtime terms,
and the cost model that applies them (prices a plan again)."""

from __future__ import annotations

import math

import pytest

import hetero
from hetero.backends.registry import default_registry
from hetero.calibration.feedback import (
    Measured,
    MeasuredHop,
    error_table,
    fold,
    hop_runs,
    partition_runs,
)
from hetero.cluster.profile import ALL_CLASSES, CALL, CalibrationProfile, Correction
from hetero.cluster.runs import HopRun, PartitionRun, RunLog, Term
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment, Objective
from hetero.partitioner.reprice import pricing, reprice

SPEC = ClusterSpec.from_dict(
    {
        "name": "fb",
        "hosts": [
            {
                "name": "box",
                "devices": [
                    {
                        "name": "cpu",
                        "kind": "cpu",
                        "cores": 2,
                        "peak_flops": {"float32": "50 GFLOPS"},
                        "bandwidth": "20 GB/s",
                        "memory": "4 GB",
                    },
                    {
                        "name": "npu",
                        "kind": "npu",
                        "peak_flops": {"float32": "100 GFLOPS"},
                        "dtypes": ["float32"],
                        "bandwidth": "20 GB/s",
                        "memory": "2 GB",
                    },
                ],
                "links": [{"between": ["cpu", "npu"], "bandwidth": "8 GB/s"}],
            }
        ],
    }
)
EAGER = BackendAssignment.everywhere("eager")


def run(device, terms, measured, call=1e-5, backend="eager", runs=10, stage=None, label=""):
    return PartitionRun(
        device=device,
        model="",
        kind="cpu",
        backend=backend,
        executor="local",
        runs=runs,
        measured_s=measured,
        stage_s=stage if stage is not None else measured,
        predicted_s=0.0,
        terms=tuple(Term(c, b, s) for c, b, s in terms),
        call_s=call,
        label=label,
    )


def factors(profile, device="box/cpu"):
    return {c.key: c.factor for c in profile.corrections if c.device == device}


def test_fold_recovers_per_class_factors_from_partitions_of_different_mix():
    # true: matmul 2x slower than predicted, norm 0.5x, call 3x
    truth = {"matmul@4": 2.0, "norm@1": 0.5, CALL: 3.0}
    mixes = [((2e-3, 1e-4), 1e-5), ((5e-4, 4e-4), 1e-5), ((1e-4, 1e-5), 1e-5), ((1e-3, 0), 1e-5)]
    records = []
    for (mm, nm), call in mixes:
        terms = [("matmul", 4, mm)] + ([("norm", 1, nm)] if nm else [])
        y = truth["matmul@4"] * mm + truth["norm@1"] * nm + truth[CALL] * call
        records.append(run("box/cpu", terms, y, call))
    profile = fold(None, RunLog("fb", tuple(records)))
    got = factors(profile)
    for key, want in truth.items():
        assert got[key] == pytest.approx(want, rel=0.05), key
    # fallbacks: the class (over its buckets) and all classes, weighted by time
    assert got["matmul"] == pytest.approx(2.0, rel=0.03)
    assert 0.5 < got[ALL_CLASSES] < 2.0
    rows = error_table(RunLog("fb", tuple(records)), profile)
    assert max(abs(p - m) / m for _, m, p in rows) < 0.02


def test_one_partition_is_matched_exactly_by_one_factor_for_its_device():
    rec = run("box/cpu", [("matmul", 5, 3e-3), ("elementwise", 1, 1e-4)], 6.3e-3, call=1e-5)
    profile = fold(None, RunLog("fb", (rec,)))
    [(_, measured, predicted)] = error_table(RunLog("fb", (rec,)), profile)
    assert predicted == pytest.approx(measured, rel=0.01)
    got = factors(profile)
    # one record cannot tell its keys apart: the device's factor carries the deviation, so
    # a small group (or a class the run did not have) is priced as slow as the big one
    ratio = 6.3e-3 / (3e-3 + 1e-4 + 1e-5)
    for key in ("matmul@5", "matmul", "elementwise@1", "elementwise", ALL_CLASSES, CALL):
        assert got[key] == pytest.approx(ratio, rel=0.03), key


def test_fold_keeps_other_pairs_and_centres_on_the_factors_in_force():
    kept = Correction("box/npu", "tvm", "matmul", 4.0, 7)
    prior = Correction("box/cpu", "eager", "matmul", 2.0, 5)
    base = CalibrationProfile("fb", corrections=(kept, prior))
    # a record that asks for nothing new on the matmul class keeps its factor near 2
    rec = run("box/cpu", [("matmul", 3, 1e-3)], 2e-3 + 1e-5)
    profile = fold(base, RunLog("fb", (rec,)))
    assert kept in profile.corrections
    assert factors(profile)["matmul@3"] == pytest.approx(2.0, rel=0.02)


def test_runtime_terms_are_medians_of_stage_and_hop_excess():
    parts = tuple(
        run("box/cpu", [("matmul", 3, 1e-3)], 1e-3, stage=1e-3 + extra, runs=5)
        for extra in (20e-6, 30e-6, 25e-6)
    )
    hops = tuple(
        HopRun("box/cpu", "box/npu", "ray", 5, 4096, link + 0.8e-3, link)
        for link in (1e-5, 2e-5, 3e-5)
    )
    profile = fold(None, RunLog("fb", parts, hops))
    local, ray = profile.runtime_for("local"), profile.runtime_for("ray")
    assert local.stage_overhead == pytest.approx(25e-6, rel=1e-6) and local.hop_overhead == 0.0
    assert ray.hop_overhead == pytest.approx(0.8e-3, rel=1e-6)


def test_records_of_a_plan_price_its_partitions_with_the_base_model(mlp):
    model, x = mlp
    graph = hetero.capture(model, x)
    registry = default_registry()
    cm = CostModel()
    pins = {"l1": "box/cpu", "l2": "box/npu"}
    plan = hetero.plan(graph, SPEC, backends=EAGER, cost_model=cm, pins=pins)
    assert len(plan.partitions) >= 2
    priced = pricing(
        graph, SPEC, Objective.LATENCY, registry=registry, cost_model=cm, backends=EAGER, pins=pins
    )
    measured = {
        p.index: Measured(10, 2 * p.predicted_ms, 2 * p.predicted_ms + 0.02)
        for p in plan.partitions
    }
    recs = partition_runs(plan, priced, measured, executor="ray")
    assert [r.label for r in recs] == [f"{plan.model}/p{p.index}" for p in plan.partitions]
    for r, p in zip(recs, plan.partitions, strict=True):
        # the terms and the call add up to what the plan predicted (no executor terms yet)
        assert sum(t.seconds for t in r.terms) + r.call_s == pytest.approx(p.predicted_ms / 1e3)
    hops = hop_runs(
        plan,
        priced,
        {(t.src, t.dst): MeasuredHop(10, t.bytes, 1.0) for t in plan.transfers},
        executor="ray",
    )
    assert all(h.src != h.dst for h in hops)

    # folded: every partition twice as slow -> the plan re-priced predicts the measurements
    profile = fold(None, RunLog(SPEC.name, recs, hops))
    corrected = CostModel(profile, executor="ray")
    again = reprice(
        plan,
        pricing(
            graph, SPEC, Objective.LATENCY, registry=registry, cost_model=corrected, backends=EAGER
        ),
        note="corrected",
    )
    for p, before in zip(again.partitions, plan.partitions, strict=True):
        assert p.predicted_ms == pytest.approx(2 * before.predicted_ms + 0.02, rel=0.05)
    assert again.notes[-1] == "corrected"
    cross = [t for t in again.transfers if t.src_device != t.dst_device]
    assert cross and all(t.predicted_ms > 0.9 for t in cross)  # the measured 1 ms hop is priced


def test_a_plan_reprices_to_itself_without_feedback(mlp):
    model, x = mlp
    graph = hetero.capture(model, x)
    plan = hetero.plan(graph, SPEC, backends=EAGER, cost_model=CostModel())
    priced = pricing(
        graph,
        SPEC,
        Objective.LATENCY,
        registry=default_registry(),
        cost_model=CostModel(),
        backends=EAGER,
    )
    again = reprice(plan, priced)
    assert [p.predicted_ms for p in again.partitions] == pytest.approx(
        [p.predicted_ms for p in plan.partitions]
    )
    assert again.predicted_ms == pytest.approx(plan.predicted_ms)
    assert math.isfinite(again.predicted_ms)


def _cpu_flops(plan) -> int:
    return sum(p.flops for p in plan.partitions if p.device == "box/cpu")


def test_a_cpu_measured_slower_than_its_profile_moves_the_replanned_split_off_it(tiny_gpt):
    # the profile's CPU is 40% too fast: one plan's run measures it so, the NPU as predicted;
    # after one fold the planner gives the CPU less work, priced with groups the run's CPU
    # partition never ran (the corrections cover every group of the device's keys)
    model, x = tiny_gpt
    graph = hetero.capture(model, x)
    registry = default_registry()
    cm = CostModel()
    obj = Objective.THROUGHPUT
    plan = hetero.plan(graph, SPEC, obj, backends=EAGER, cost_model=cm)
    assert {p.device for p in plan.partitions} == {"box/cpu", "box/npu"}
    priced = pricing(graph, SPEC, obj, registry=registry, cost_model=cm, backends=EAGER)
    slow = {"box/cpu": 1.4, "box/npu": 1.0}
    measured = {
        p.index: Measured(10, slow[p.device] * p.predicted_ms, slow[p.device] * p.predicted_ms)
        for p in plan.partitions
    }
    profile = fold(
        None, RunLog(SPEC.name, partition_runs(plan, priced, measured, executor="local"))
    )
    corrected = CostModel(profile)
    again = hetero.plan(graph, SPEC, obj, backends=EAGER, cost_model=corrected)
    assert _cpu_flops(again) < _cpu_flops(plan)
    # and the re-plan is better by the corrected costs than the measured plan re-priced
    running = reprice(
        plan, pricing(graph, SPEC, obj, registry=registry, cost_model=corrected, backends=EAGER)
    )
    assert again.predicted_ms < running.predicted_ms


def test_a_class_no_run_measured_takes_the_measured_time_weighted_mean():
    # records of similar mixes whose small classes ran slow and whose matmuls ran fast: the
    # fit pulls classes apart; an unmeasured class (attention here) is priced by what the
    # device's measured time says on average, between the measured classes' factors
    recs = tuple(
        run("box/cpu", [("matmul", 2, mm), ("elementwise", 1, ew), ("norm", 0, nm)], y)
        for mm, ew, nm, y in (
            (4e-4, 2e-5, 1e-5, 0.50e-3),
            (4e-4, 1e-5, 1e-5, 0.45e-3),
            (1e-4, 2e-5, 2e-5, 0.21e-3),
        )
    )
    got = factors(fold(None, RunLog("fb", recs)))
    measured = [got[k] for k in ("matmul@2", "elementwise@1", "norm@0")]
    assert min(measured) <= got[ALL_CLASSES] <= max(measured)
    weight = {"matmul@2": 9e-4, "elementwise@1": 5e-5, "norm@0": 4e-5}
    mean = sum(w * math.log(got[k]) for k, w in weight.items()) / sum(weight.values())
    assert got[ALL_CLASSES] == pytest.approx(math.exp(mean), rel=1e-6)
