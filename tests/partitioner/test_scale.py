"""The planner at scale: device classes and host types, stages by a DP over counts, exact
search; against brute force on small random problems (no torch), and on real models and
every shipped cluster against today's planners."""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from symmetric_cases import flat_layout, layout, symmetric_problem
from test_algorithms import random_problem
from typer.testing import CliRunner

import hetero
from hetero.backends.registry import default_registry
from hetero.errors import ConfigError
from hetero.interfaces import models
from hetero.interfaces.cli import app
from hetero.interfaces.config import load_config
from hetero.partitioner.algorithms import exhaustive, exhaustive_pipelines, latency, throughput
from hetero.partitioner.algorithms.auto import coarsen_for_scale, seconds, solve
from hetero.partitioner.algorithms.branch import branch_and_bound, interchangeable
from hetero.partitioner.algorithms.stages import bottleneck_bound, pipeline, to_assignment
from hetero.partitioner.algorithms.symmetry import analyse
from hetero.partitioner.algorithms.tiers import expand, from_problem, placement_index
from hetero.partitioner.decisions import BackendAssignment, Objective
from hetero.partitioner.split import run_partitions, split

_FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_REL = 1e-9
L, T = Objective.LATENCY, Objective.THROUGHPUT


def _exhaustive(problem, objective):
    return (exhaustive_pipelines if objective.pipelined else exhaustive)(problem)


def _staged(problem, slots, counts, hosts, objective):
    tiers = from_problem(problem, slots, counts, hosts)
    plan = pipeline(tiers, objective)
    if plan is None:
        return tiers, None, None
    device_of = {s: i for i, s in enumerate(slots)}
    return tiers, plan, to_assignment(plan, tiers, device_of, placement_index(problem))


def _host_contiguous_optimum(problem, slots) -> float:
    """Brute force over pipelines whose stages visit each host once (in any order)."""
    allowed = problem.allowed()
    live = problem.live_bytes()
    host = [(s.host_type, s.host) for s in slots]
    best = np.inf
    assign = np.zeros(problem.n, dtype=int)

    def rec(start: int, used: frozenset, hosts: tuple) -> None:
        nonlocal best
        if start == problem.n:
            if problem.feasible(assign):
                best = min(best, max(problem.stage_times(assign, live)))
            return
        for stop in range(start + 1, problem.n + 1):
            for p in range(problem.num_placements):
                d = int(problem.place_device[p])
                h = host[d]
                if d in used or not allowed[start:stop, p].all():
                    continue
                if h in hosts and hosts[-1] != h:
                    continue  # back to a host already left
                assign[start:stop] = p
                rec(stop, used | {d}, hosts if hosts and hosts[-1] == h else (*hosts, h))

    rec(0, frozenset(), ())
    return best


# ---- the stage DP --------------------------------------------------------------------------


@_FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 7),
    gpus=st.integers(1, 3),
    chain=st.booleans(),
    memory=st.booleans(),
)
def test_stage_dp_on_one_host_equals_exhaustive(seed, n, gpus, chain, memory):
    p, slots, counts, hosts = symmetric_problem(seed, n, gpus=gpus, chain=chain, memory=memory)
    _, plan, assign = _staged(p, slots, counts, hosts, T)
    ex = exhaustive_pipelines(p)
    if plan is None:
        assert not np.isfinite(ex.seconds)
        return
    assert p.feasible(assign) and p.pipeline_valid(assign)
    # the DP's own numbers are the Problem's, on the names it chose
    assert p.throughput(assign) == pytest.approx(plan.bottleneck, rel=_REL)
    assert plan.bottleneck == pytest.approx(ex.seconds, rel=_REL)


@_FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 5),
    hosts=st.integers(1, 2),
    chain=st.booleans(),
    memory=st.booleans(),
)
def test_stage_dp_across_hosts_is_exact_for_contiguous_node_groups(seed, n, hosts, chain, memory):
    p, slots, counts, host_n = symmetric_problem(
        seed, n, gpus=1, hosts=hosts, chain=chain, memory=memory
    )
    tiers, plan, assign = _staged(p, slots, counts, host_n, T)
    contiguous = _host_contiguous_optimum(p, slots)
    ex = exhaustive_pipelines(p)
    if plan is None:
        assert not np.isfinite(contiguous)
        return
    assert p.throughput(assign) == pytest.approx(plan.bottleneck, rel=_REL)
    assert plan.bottleneck == pytest.approx(contiguous, rel=_REL)
    assert plan.bottleneck >= ex.seconds * (1 - _REL)
    assert bottleneck_bound(tiers) <= ex.seconds * (1 + _REL)


@_FAST
@given(seed=st.integers(0, 2**31), n=st.integers(1, 8), hosts=st.integers(0, 2))
def test_expand_rebuilds_the_problem_from_representatives(seed, n, hosts):
    p, slots, _, _ = symmetric_problem(seed, n, gpus=3, hosts=hosts, other_gpus=2)
    reps = [i for i, s in enumerate(slots) if s.host < 2 and s.instance < 2]
    small = expand(p, slots, [(p.devices[i], slots[i]) for i in reps], p.devices[p.origin])
    again = expand(
        small, [slots[i] for i in reps], list(zip(p.devices, slots, strict=True)), small.devices[0]
    )
    for name in ("compute", "unary", "link_latency", "link_inv_bw", "capacity"):
        np.testing.assert_allclose(getattr(again, name), getattr(p, name))
    assert again.placements == p.placements


def test_latency_stage_dp_sums_the_stages():
    p, slots, counts, hosts = symmetric_problem(3, 6, gpus=2, hosts=1)
    _, plan, assign = _staged(p, slots, counts, hosts, L)
    assert plan.total == pytest.approx(sum(p.stage_times(assign)), rel=_REL)


# ---- exact latency -------------------------------------------------------------------------


@_FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 7),
    symmetric=st.booleans(),
    chain=st.booleans(),
    memory=st.booleans(),
)
def test_branch_and_bound_equals_exhaustive(seed, n, symmetric, chain, memory):
    if symmetric:
        p, *_ = symmetric_problem(
            seed, n, gpus=2, hosts=1 if n <= 5 else 0, chain=chain, memory=memory
        )
    else:
        p = random_problem(seed, n, 3, chain=chain, memory=memory)
    ex = exhaustive(p)
    result = branch_and_bound(p)
    assert result.proven
    if not np.isfinite(ex.seconds):
        assert result.assign is None
        return
    assert p.feasible(result.assign)
    assert result.value == pytest.approx(ex.seconds, rel=_REL)
    assert p.latency(result.assign) == pytest.approx(result.value, rel=_REL)


def test_identical_devices_are_found_interchangeable():
    p, slots, *_ = symmetric_problem(0, 5, gpus=3, hosts=2, other_gpus=2)
    classes = {tuple(c) for c in interchangeable(p)}
    by_place = {}
    for d, s in enumerate(slots):
        by_place.setdefault((s.cls, s.host_type, s.host), []).append(d)
    for members in by_place.values():  # the GPUs of one host are interchangeable
        assert any(set(members) <= set(c) for c in classes)
    assert (p.origin,) in classes


def test_branch_and_bound_stops_at_the_deadline():
    p = random_problem(1, 40, 3, chain=False, memory=True)
    result = branch_and_bound(p, deadline=0.0)
    assert not result.proven


# ---- the default planner on small random problems --------------------------------------------


@_FAST
@given(
    seed=st.integers(0, 2**31),
    n=st.integers(1, 6),
    objective=st.sampled_from(list(Objective)),
    symmetric=st.booleans(),
    memory=st.booleans(),
)
def test_auto_finds_the_exhaustive_optimum_and_says_so(seed, n, objective, symmetric, memory):
    if symmetric:
        p, slots, counts, hosts = symmetric_problem(
            seed, n, gpus=2, hosts=1 if n <= 4 else 0, chain=seed % 2 == 0, memory=memory
        )
    else:
        p = random_problem(seed, n, 3, chain=seed % 2 == 0, memory=memory)
        slots, counts, hosts = flat_layout(p)
    found, optimal, _ = solve(p, slots, layout(p, slots, counts, hosts), objective, flat=True)
    ex = _exhaustive(p, objective)
    if not np.isfinite(ex.seconds):
        assert found.over > 0 or not np.isfinite(found.value)
        return
    assert found.over == 0
    assert found.value == pytest.approx(ex.seconds, rel=_REL)
    assert optimal


@pytest.mark.parametrize("objective", list(Objective))
def test_auto_is_never_worse_than_todays_algorithms_on_random_problems(objective):
    for seed in range(15):
        p = random_problem(seed, 10, 3, chain=seed % 2 == 0, memory=seed % 3 == 0)
        slots, counts, hosts = flat_layout(p)
        found, _, _ = solve(p, slots, layout(p, slots, counts, hosts), objective, flat=True)
        today = (throughput if objective.pipelined else latency)(p)
        if not p.feasible(today.assign):
            continue
        assert found.over == 0
        assert found.value <= seconds(p, today.assign, objective) * (1 + _REL)


# ---- real models ---------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "configs" / "clusters").glob("*.yaml"))


def nodes_cluster(nodes: int, gpus: int) -> hetero.Cluster:
    """`nodes` hosts of `gpus` GPUs (NVLink) and a CPU (PCIe), a network between hosts."""
    gpu = {
        "name": "gpu", "kind": "gpu", "count": gpus, "memory": "80 GB", "bandwidth": "3.35 TB/s",
        "peak_flops": {"float32": "67 TFLOPS", "float16": "989 TFLOPS"},
    }  # fmt: skip
    cpu = {"name": "cpu", "kind": "cpu", "memory": "256 GiB", "bandwidth": "150 GB/s",
           "peak_flops": {"float32": "4 TFLOPS"}}  # fmt: skip
    links = [{"between": ["gpu", "cpu"], "bandwidth": "54 GB/s"}]
    if gpus > 1:
        links.append({"between": ["gpu", "gpu"], "bandwidth": "450 GB/s", "kind": "nvlink"})
    hosts = [{"name": f"n{i}", "devices": [gpu, cpu], "links": links} for i in range(nodes)]
    doc = {"name": f"{nodes}x{gpus}", "hosts": hosts, "network": {"bandwidth": "50 GB/s"}}
    return hetero.Cluster.from_dict(doc)


@pytest.fixture(scope="module")
def bundled():
    graphs = {}
    for name, factory in (("tiny_gpt", models.tiny_gpt), ("mlp_block", models.mlp_block)):
        model, inputs = factory()
        graphs[name] = hetero.capture(model, inputs)
    return graphs


@pytest.fixture(scope="module")
def registry():
    return default_registry()


@pytest.mark.parametrize("cluster", SHIPPED, ids=lambda p: p.stem)
@pytest.mark.parametrize("objective", list(Objective))
def test_auto_is_never_worse_than_todays_planner_on_shipped_clusters(
    bundled, registry, cluster, objective
):
    spec = hetero.Cluster.from_yaml(cluster)
    for graph in bundled.values():
        auto = hetero.plan(graph, spec, objective, registry=registry)
        today = hetero.plan(graph, spec, objective, registry=registry, algorithm=objective.value)
        assert auto.method and auto.algorithm == "auto"
        assert auto.predicted_ms <= today.predicted_ms * (1 + _REL)


def test_auto_plans_across_hosts_run_like_eager(tiny_gpt, registry):
    model, inputs = tiny_gpt
    graph = hetero.capture(model, inputs)
    spec = nodes_cluster(3, 2)
    plan = hetero.plan(graph, spec, "throughput", registry=registry)
    names = {d.name for d in spec.devices}
    assert set(plan.devices()) <= names
    assert any("device classes" in n for n in plan.notes)
    parts = split(graph, plan.assignment())
    out = run_partitions(graph, parts, *inputs)
    with torch.no_grad():
        torch.testing.assert_close(out, model(*inputs))


def test_auto_matches_todays_exact_pipeline_on_two_hosts(tiny_gpt, registry):
    model, inputs = tiny_gpt
    graph = hetero.capture(model, inputs)
    spec = nodes_cluster(2, 2)
    auto = hetero.plan(graph, spec, "throughput", registry=registry)
    today = hetero.plan(graph, spec, "throughput", registry=registry, algorithm="throughput")
    assert auto.predicted_ms <= today.predicted_ms * 1.02


def _llama(layers: int, device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=64, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).eval()
    return model, (torch.zeros((1, 16), dtype=torch.long, device=device),)


def test_capture_on_the_meta_device_sees_what_real_weights_show():
    meta = hetero.capture(*_llama(2, "meta"))
    real = hetero.capture(*_llama(2, "cpu"))
    assert meta.param_bytes == real.param_bytes > 0
    assert meta.total_flops == real.total_flops
    ops_meta, ops_real = Counter(n.target for n in meta), Counter(n.target for n in real)
    # the rotary embedding copies its tables on a device without autocast: two clones
    assert not ops_real - ops_meta and set(ops_meta - ops_real) <= {"aten.clone.default"}


def test_many_identical_layers_become_groups_and_are_priced_once(registry):
    graph = hetero.capture(*_llama(12, "meta"))
    groups = coarsen_for_scale(graph, max_groups=8)
    layers = [g for g in groups if g.name.startswith("model.layers.")]
    assert len(layers) == 12  # not one group holding every layer
    spec = nodes_cluster(16, 8)
    for objective in Objective:
        plan = hetero.plan(graph, spec, objective, registry=registry, time_budget_s=5)
        assert set(plan.devices()) <= {d.name for d in spec.devices}
        note = next(n for n in plan.notes if n.startswith("planned over"))
        assert "144" not in note.split(":")[0]  # classes, not devices
        assert "repeats reused" in note
    assert len(plan.devices()) > 9  # the pipeline spans hosts


def test_time_budget_and_progress_are_reported(tiny_gpt, registry):
    model, inputs = tiny_gpt
    graph = hetero.capture(model, inputs)
    seen = []
    plan = hetero.plan(
        graph,
        nodes_cluster(1, 2),
        "latency",
        registry=registry,
        time_budget_s=2.0,
        progress=lambda phase, spent, budget: seen.append((phase, budget)),
    )
    assert seen and all(b == 2.0 for _, b in seen)
    assert "method:" in plan.explain()
    again = hetero.Plan.from_json(plan.to_json())
    assert (again.method, again.optimal) == (plan.method, plan.optimal)
    with pytest.raises(ConfigError, match="time_budget_s"):
        hetero.plan(graph, nodes_cluster(1, 2), time_budget_s=0)


def test_plan_command_plans_a_transformers_config_on_the_meta_device(tmp_path):
    cfg = {
        "model": {
            "transformers": "LlamaConfig",
            "config": {
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 2,
                "num_attention_heads": 4,
                "num_key_value_heads": 2,
                "vocab_size": 256,
            },
            "device": "meta",
            "inputs": {"batch": 1, "seq": 16},
        },
        "dtype": "float16",
        "cluster": str(ROOT / "configs/clusters/h100x2.yaml"),
    }
    path = tmp_path / "meta.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(app, ["plan", str(path), "--out", str(out), "--time-budget", "5"])
    assert result.exit_code == 0, result.output
    assert "method:" in result.output
    assert hetero.Plan.from_json(out).model == "LlamaForCausalLM"
    with pytest.raises(ConfigError, match="meta device"):
        load_config(path).load_model()  # compile, deploy and serve need weights


def test_shipped_meta_config_names_a_transformers_model():
    cfg = load_config(ROOT / "configs/llama-70b-meta.yaml")
    assert cfg.model.transformers == "LlamaConfig" and cfg.model.device == "meta"
    assert cfg.model.config["num_hidden_layers"] == 80


# ---- symmetry of cluster descriptions --------------------------------------------------------


def test_identical_nodes_become_classes_and_types():
    spec = nodes_cluster(3, 8)
    sym = analyse(spec, BackendAssignment(), origin="n0/cpu")
    assert sym.regular
    sizes = sorted(len(c) for c in sym.classes)
    assert sizes == [1, 2, 24]  # the origin CPU, the other CPUs, the GPUs
    assert sym.host_types == (("n0",), ("n1", "n2"))
    small, slots = sym.reduced()
    assert set(slots) == {d.name for d in small.devices}
    assert len(small.devices) == 1 + 2 + 2 * (2 + 1)
    for a, b in itertools.permutations([d.name for d in small.devices], 2):
        assert small.transfer_time(a, b, 1e6) == spec.transfer_time(a, b, 1e6)
    for name, slot in sym.slots.items():
        assert sym.names[slot] == name


def test_devices_kept_apart_and_irregular_hosts_are_classes_of_their_own():
    spec = nodes_cluster(2, 4)
    sym = analyse(spec, BackendAssignment(), origin="n0/cpu", distinct={"n1/gpu2"})
    assert ("n1/gpu2",) in sym.classes and len(sym.host_types) == 2
    # NVLink between two of a host's four GPUs only: they are not interchangeable
    links = [l for l in spec.links if not (l.kind == "nvlink" and "n1/gpu3" in (l.a, l.b))]
    uneven = hetero.Cluster(spec.name, spec.devices, tuple(links))
    sym = analyse(uneven, BackendAssignment(), origin="n0/cpu")
    assert not sym.regular and "n1" in sym.why
    assert all(len(c) == 1 for c in sym.classes if sym.cluster.device(c[0]).host == "n1")


def test_a_network_that_is_not_uniform_gives_every_host_its_own_type():
    spec = nodes_cluster(3, 2)
    links = tuple(
        replace(l, bandwidth=l.bandwidth / 2) if {l.a, l.b} == {"n1/cpu", "n2/cpu"} else l
        for l in spec.links
    )
    sym = analyse(
        hetero.Cluster(spec.name, spec.devices, links),
        BackendAssignment(),
        origin="n0/cpu",
    )
    assert len(sym.host_types) == 3 and not sym.regular
