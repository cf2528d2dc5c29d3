"""Planning a generation: decode first (resident / streamed / split / CPU per layer), prefill
bound to decode's resident set, caches that move once per request."""

from __future__ import annotations

import pytest
import torch
from llm_models import captured_big_llama, captured_llama, captured_wide_llama
from split_programs import split_calls, split_graph

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp
from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.algorithms.generation import plan_generation
from hetero.partitioner.generation_plan import GenerationPlan
from hetero.partitioner.gpu_cpu_split import handoffs, split_cost, split_matmuls
from hetero.partitioner.phases import Phase

H200 = "configs/clusters/h200-sxm-node.yaml"


@pytest.fixture(scope="module", autouse=True)
def _captures_let_go():
    """The wide and big captures live only as long as this module (test_generation_feedback,
    which runs before it, shares them): kept alive, their ~140k objects made every full
    garbage collection of the later modules 0.30 -> 0.45 s, and the generation modules'
    captures trigger many (the background share alone, 2026-12-06: 251 s with them kept,
    218 s let go; runs of one tree differ by up to 10%)."""
    yield
    captured_wide_llama.cache_clear()
    captured_big_llama.cache_clear()


@pytest.fixture(scope="module")
def lm():
    """Layers of ~4 MiB (float32). Four: a cap then leaves some resident and some not."""
    return captured_wide_llama()


@pytest.fixture(scope="module")
def lm_in(lm):
    """`lm`'s model captured in a dtype, each once. The 16-bit ones have 2 of its 4 layers:
    the layers are alike, and a capture's cost grows with their number."""
    got = {torch.float32: lm}

    def of(dtype: torch.dtype):
        if dtype not in got:
            got[dtype] = captured_wide_llama(dtype, layers=2)
        return got[dtype]

    return of


def capped(fraction: float, lm) -> ClusterSpec:
    weights = lm.decode.param_bytes
    return ClusterSpec.from_yaml(H200).with_device("node0/gpu", memory=int(weights * fraction))


def test_split_matmuls_are_the_linear_layers(lm):
    layer = [op.name for op in lm.decode if op.module.startswith("model.model.layers.0")]
    mms = split_matmuls(lm.decode, layer)
    assert len(mms) == 7  # q, k, v, o, gate, up, down
    assert len({m.x for m in mms}) == 4  # q/k/v share an input, gate/up too
    assert {(m.rows, m.cols) for m in mms} >= {(256, 256), (1024, 256), (256, 1024)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("phase", [Phase.DECODE, Phase.PREFILL])
def test_split_layers_hand_off_as_the_runtime_does(lm_in, phase, dtype):
    """q/k/v, o and the whole MLP: 3 hand-offs a layer, the MLP's returning [tokens, hidden]
    (not its intermediate features); the program the runtime rewrites makes exactly the op
    calls the pricing counts, in both phases (prefill's views take symbolic sizes) and in
    16 bits too (SiLU in float32 between casts: still one block)."""
    graph = lm_in(dtype).graph(phase)
    layer = [op.name for op in graph if op.module.startswith("model.model.layers.0")]
    trips = handoffs(graph, split_matmuls(graph, layer))
    assert len(trips) == 3 and sum(t.mlp for t in trips) == 1
    (mlp,) = [t for t in trips if t.mlp]
    assert graph.value_meta(mlp.outputs[0]).hint[-1] == 256  # hidden, not 1024 features
    split, _, groups = split_graph(graph, 0.5)
    calls = split_calls(split)
    mms = split_matmuls(graph, list(graph.nodes))
    trips = handoffs(graph, mms)
    assert len(calls) == len(groups) == len(trips)
    layers = len(
        {op.module.split(".")[3] for op in graph if op.module.startswith("model.model.layers.")}
    )
    assert layers == (4 if dtype == torch.float32 else 2)
    assert calls.count(gpu_cpu_mlp) == sum(t.mlp for t in trips) == layers  # one per layer
    weight = {m.node: m.weight for m in mms}  # and the same blocks, by their down's weight
    fused = {g.weights[-1] for g in groups if g.act}
    assert fused == {weight[t.outputs[0]] for t in trips if t.mlp}


@pytest.fixture(scope="module")
def big():
    """Layers of 50 MB (fp16, on the meta device), where a decode step is bound by the bytes
    it reads."""
    return captured_big_llama()


def test_split_balances_the_link_against_the_cpu(big):
    from hetero.partitioner.cost import CostModel

    cluster = ClusterSpec.from_yaml(H200)
    groups = big.decode.coarsen(depth=3)
    group = next(g for g in groups.groups if g.name == "model.model.layers.1")
    ops = [big.decode[n] for n in group.nodes]
    cost = split_cost(
        big.decode, group, ops, cluster.device("node0/gpu"), cluster.device("node0/cpu"),
        cluster, CostModel(), gpu_backend="inductor", cpu_backend="eager",
    )  # fmt: skip
    assert cost is not None and 0 < cost.fraction < 1
    # neither side alone is faster than the split
    whole = sum(m.nbytes for m in split_matmuls(big.decode, [o.name for o in ops]))
    link_only = cluster.transfer_time("node0/cpu", "node0/gpu", whole)
    assert cost.seconds < link_only
    assert cost.gpu_bytes + cost.cpu_bytes == pytest.approx(whole, rel=0.02)


@pytest.mark.parametrize("fraction", [0.85, 0.9])  # two streaming slots take 2 of 4 layers
def test_capped_gpu_plans_both_phases_within_memory(lm, fraction):
    cluster = capped(fraction, lm)
    gp = plan_generation(lm, cluster, registry=default_registry())
    cap = cluster.device("node0/gpu").memory
    for plan in (gp.prefill, gp.decode):
        assert dict(plan.memory).get("node0/gpu", 0) <= cap
    decode = {c.group: c.chosen for c in gp.choice(Phase.DECODE)}
    prefill = {c.group: c.chosen for c in gp.choice(Phase.PREFILL)}
    layers = [g for g in decode if g.startswith("model.model.layers.")]
    assert any("resident" in decode[g] for g in layers)  # what fits stays
    assert any("resident" not in decode[g] for g in layers)  # the rest cannot
    for g in layers:  # one resident copy: prefill keeps exactly decode's resident layers
        assert ("resident" in prefill[g]) == ("resident" in decode[g])
    # a layer whose cache prefill writes on another device than decode reads it moves once
    moved = sum(len(m.state) for m in gp.moves)
    elsewhere = [g for g in layers if decode[g].split()[0] != prefill[g].split()[0]]
    assert moved == 2 * len(elsewhere)  # its keys and its values
    text = gp.explain()
    assert "prefill" in text and "decode" in text and "per token" in text


def test_plan_round_trips_through_json(lm):
    gp = plan_generation(lm, capped(0.85, lm), registry=default_registry())
    again = GenerationPlan.from_json(gp.to_json())
    assert again == gp


def test_cpu_only_cluster_plans_everything_on_the_cpu():
    lm = captured_llama(torch.float32)
    gp = plan_generation(lm, ClusterSpec.from_yaml("configs/clusters/cpu-2core.yaml"),
                         registry=default_registry())  # fmt: skip
    assert {p.device for p in gp.decode.partitions} == {"box/cpu"}
    assert not gp.moves and gp.predicted_decode_ms > 0


def test_forced_decode_placements_are_honoured(lm):
    gp = plan_generation(
        lm, capped(0.6, lm), registry=default_registry(),
        decode_placements={"model.model.layers.2": "split", "model.model.layers.3": "node0/cpu"},
    )  # fmt: skip
    decode = {c.group: c.chosen for c in gp.choice(Phase.DECODE)}
    assert "split" in decode["model.model.layers.2"]
    assert decode["model.model.layers.3"] == "node0/cpu"
    split = next(p for p in gp.decode.partitions if p.weights == "split")
    assert split.split and 0 < split.split[0][1] < 1 and split.cpu_dtype


def test_a_device_and_home_together_keep_resident_layers_off_the_cpu(lm):
    # "resident" alone takes the CPU too (its weights are resident there): a forced
    # comparison names the GPU with it
    everywhere = {"model.model.layers": "node0/gpu:resident|streamed"}
    gp = plan_generation(lm, capped(0.6, lm), registry=default_registry(),
                         decode_placements=everywhere)  # fmt: skip
    decode = {c.group: c.chosen for c in gp.choice(Phase.DECODE) if ".layers." in c.group}
    assert decode and all(where.startswith("node0/gpu ") for where in decode.values()), decode
    assert {where.split()[1] for where in decode.values()} <= {"resident", "streamed"}


@pytest.mark.parametrize(
    ("forced", "words"),
    [
        ({"model.model.layer.2": "split"}, ["'model.model.layer.2' names no group"]),
        ({"model.model.layers.2": "node0/npu"}, ["cannot be placed so", "node0/gpu:split"]),
    ],
    ids=["no such group", "nowhere allowed"],
)
def test_a_forced_placement_that_cannot_be_had_is_an_error_not_another_plan(lm, forced, words):
    from hetero.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        plan_generation(lm, capped(0.6, lm), registry=default_registry(),
                        decode_placements=forced)  # fmt: skip
    for w in words:
        assert w in str(err.value)


def test_a_forced_module_path_is_not_a_prefix_of_its_siblings():
    from hetero.partitioner.algorithms.generation import _under

    assert _under("model.layers.1", "model.layers.1")
    assert _under("model.layers.1.mlp", "model.layers.1")
    assert not _under("model.layers.10", "model.layers.1")
    assert _under("model.layers.10", "model.layers.")  # a key ending in "." is a prefix


def _host_rates(float16: float, bfloat16: float | None):
    from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency
    from hetero.partitioner.cost import CostModel

    rates = [Efficiency("matmul/float16", float16, float16)]
    if bfloat16 is not None:
        rates.append(Efficiency("matmul/bfloat16", bfloat16, bfloat16))
    device = DeviceProfile("box/cpu", "cpu", efficiency=tuple(rates), backend="eager")
    return CostModel(profile=CalibrationProfile(cluster="cpu-2core", devices=(device,)))


@pytest.mark.parametrize(
    ("model_dtype", "float16", "bfloat16", "chosen"),
    [
        (torch.float16, 0.3, 0.6, "bfloat16"),  # the host reads bfloat16 faster: copies
        (torch.float16, 0.6, 0.3, ""),  # float16 is faster: the model's own
        (torch.float16, 0.6, None, ""),  # only float16 measured: never a guess
        (torch.float32, 0.3, 0.6, ""),  # never below the model's precision
    ],
)
def test_the_cpu_computes_in_the_dtype_its_measured_rates_make_fastest(
    model_dtype, float16, bfloat16, chosen
):
    lm = captured_llama(model_dtype)
    cluster = ClusterSpec.from_yaml("configs/clusters/cpu-2core.yaml")
    cm = _host_rates(float16, bfloat16)
    gp = plan_generation(
        lm, cluster, registry=default_registry(), cost_model=cm, host_precision="fastest"
    )
    for plan in (gp.prefill, gp.decode):  # one copy of the weights and cache serves both
        assert {p.cpu_dtype for p in plan.partitions} == {chosen}
    labels = {c.chosen for c in gp.choice(Phase.DECODE)}
    assert labels == {f"box/cpu {chosen}".strip()}
    assert any("bfloat16 copies" in n for n in gp.notes) == bool(chosen)
    if chosen:  # and it is priced at the rate it runs at
        own = plan_generation(
            lm, cluster, registry=default_registry(), cost_model=_host_rates(float16, None)
        )
        assert gp.predicted_decode_ms < own.predicted_decode_ms


def test_a_capped_gpu_keeps_memory_for_the_runtime_and_says_how_much(lm):
    from hetero.partitioner.algorithms.generation import RUNTIME_RESERVE, runtime_reserve

    assert runtime_reserve(4 << 30) == RUNTIME_RESERVE  # a 7B run's cap: all of it
    assert runtime_reserve(64 << 20) < 8 << 20  # a tiny cap keeps most of itself
    assert runtime_reserve(None) == 0
    cluster = capped(0.85, lm)
    gp = plan_generation(lm, cluster, registry=default_registry())
    kept = runtime_reserve(cluster.device("node0/gpu").memory)
    assert any(f"node0/gpu {kept / 2**20:.0f} MiB" in n for n in gp.notes)
    used = dict(gp.decode.memory)["node0/gpu"]
    assert used <= cluster.device("node0/gpu").memory - kept


def _runtime_priced(executor: str, stage_s: float = 0.0, hop_s: float = 0.0):
    from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
    from hetero.partitioner.cost import CostModel

    runtime = (RuntimeProfile(executor, stage_overhead=stage_s, hop_overhead=hop_s),)
    return CostModel(CalibrationProfile("any", runtime=runtime), executor=executor)


def test_ray_prices_a_hop_where_stages_cross_workers_and_a_stage_per_partition(tiny_llama_lm):
    """Over Ray each device's stages run in its own actor and the caller is the driver: each
    partition pays the stage overhead, each transfer between devices and each way in and
    out of the caller a hop. In process, the caller's values stay where they are."""
    from hetero.partitioner.algorithms.generation import GENERATION_BACKENDS, decode_pricing
    from hetero.partitioner.reprice import reprice

    cluster = ClusterSpec.from_yaml("configs/clusters/dev-box-npu.yaml")
    kw = dict(
        registry=default_registry(), backends=GENERATION_BACKENDS.with_kind("npu", "eager"),
        pins={"model.model.layers.1": "npu"},
    )  # fmt: skip
    local = plan_generation(tiny_llama_lm, cluster, cost_model=_runtime_priced("local"), **kw)
    stage_s, hop_s = 1e-3, 10e-3
    ray_cm = _runtime_priced("ray", stage_s, hop_s)
    ray = reprice(local.decode, decode_pricing(tiny_llama_lm, cluster, cost_model=ray_cm, **kw))
    parts = local.decode.partitions
    assert [p.device for p in parts] == ["local/cpu", "local/npu", "local/cpu"]
    for before, after in zip(parts, ray.partitions, strict=True):
        assert after.predicted_ms == pytest.approx(before.predicted_ms + 1e3 * stage_s)
    crossing = {(t.src, t.dst): t.predicted_ms for t in local.decode.transfers}
    assert len(crossing) == 2  # cpu -> npu -> cpu; the caller's values stay on the CPU
    for t in ray.transfers:
        assert t.predicted_ms == pytest.approx(crossing.get((t.src, t.dst), 0.0) + 1e3 * hop_s)
    assert {(t.src, t.dst) for t in ray.transfers} - set(crossing) == {(-1, 0), (2, -1)}
    assert ray.predicted_ms == pytest.approx(
        local.decode.predicted_ms + 1e3 * (3 * stage_s + 4 * hop_s)
    )


def test_a_split_layers_hand_offs_stay_in_its_worker_whatever_the_executor(big):
    """The GPU's worker computes the CPU's rows itself: a split layer's hand-offs cross the
    link, never a hop between Ray workers."""
    cluster = ClusterSpec.from_yaml(H200)
    group = next(g for g in big.decode.coarsen(depth=3).groups if g.name == "model.model.layers.1")
    ops = [big.decode[n] for n in group.nodes]

    def priced(cm):
        return split_cost(
            big.decode, group, ops, cluster.device("node0/gpu"), cluster.device("node0/cpu"),
            cluster, cm, gpu_backend="inductor", cpu_backend="eager",
        )  # fmt: skip

    local, ray = priced(_runtime_priced("local")), priced(_runtime_priced("ray", 1e-3, 10e-3))
    assert ray.handoffs == local.handoffs > 0
    assert ray.path_s == pytest.approx(local.path_s)
    assert ray.seconds == pytest.approx(local.seconds)


def test_a_split_shares_only_the_trips_worth_their_hand_offs(big, monkeypatch):
    """A hand-off sits on the host's serial path while the bytes it saves the link overlap:
    where hand-offs are dear, the split makes fewer trips and streams the other matrices
    whole (`SplitCost.whole`), and that prices below sharing every matmul."""
    from hetero.partitioner import gpu_cpu_split

    cluster = ClusterSpec.from_yaml(H200)
    group = next(g for g in big.decode.coarsen(depth=3).groups if g.name == "model.model.layers.1")
    ops = [big.decode[n] for n in group.nodes]
    weights = {m.weight for m in split_matmuls(big.decode, [o.name for o in ops])}

    def priced(handoff_s):
        from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
        from hetero.partitioner.cost import CostModel

        runtime = (RuntimeProfile("local", 0.0, 0.0, split_handoff=handoff_s),)
        return split_cost(
            big.decode, group, ops, cluster.device("node0/gpu"), cluster.device("node0/cpu"),
            cluster, CostModel(CalibrationProfile("any", runtime=runtime)),
            gpu_backend="inductor", cpu_backend="eager",
        )  # fmt: skip

    cheap, dear = priced(0.0), priced(2e-3)
    assert dear.handoffs <= cheap.handoffs <= 3 and dear.whole and set(dear.whole) < weights
    monkeypatch.setattr(gpu_cpu_split, "_MAX_TRIPS", 0)  # every matmul shared, as before
    every = priced(2e-3)
    assert every.handoffs == 3 and not every.whole
    assert dear.seconds < every.seconds
    # the bytes still add up: what the GPU streams (shares and whole matrices) and the CPU reads
    whole_bytes = sum(m.nbytes for m in split_matmuls(big.decode, [o.name for o in ops]))
    assert dear.gpu_bytes + dear.cpu_bytes == pytest.approx(whole_bytes, rel=0.02)


def test_a_running_split_is_repriced_as_it_runs(big):
    """Feedback re-prices the running plan at corrected prices and compares its measured
    partitions with those prices: a split group keeps the share and trips that ran
    (`fixed`), where choosing again would price hand-offs that were never made."""
    from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.gpu_cpu_split import SplitDecision

    cluster = ClusterSpec.from_yaml(H200)
    group = next(g for g in big.decode.coarsen(depth=3).groups if g.name == "model.model.layers.1")
    ops = [big.decode[n] for n in group.nodes]

    def priced(handoff_s, fixed=None):
        runtime = (RuntimeProfile("local", 0.0, 0.0, split_handoff=handoff_s),)
        return split_cost(
            big.decode, group, ops, cluster.device("node0/gpu"), cluster.device("node0/cpu"),
            cluster, CostModel(CalibrationProfile("any", runtime=runtime)),
            gpu_backend="inductor", cpu_backend="eager", fixed=fixed,
        )  # fmt: skip

    # every matmul shared at a third of the rows: a plan a cheaper round chose, say
    ran = SplitDecision(fraction=21 / 64, whole=())
    again = priced(2e-3)  # chosen afresh at dear hand-offs: fewer trips, another share
    kept = priced(2e-3, fixed=ran)
    assert (kept.fraction, kept.whole, kept.handoffs) == (ran.fraction, (), 3)
    assert again.handoffs < 3 and kept.seconds > again.seconds
    # and a decision that streams some matrices whole is priced with them whole
    partial = priced(2e-3, fixed=SplitDecision(again.fraction, again.whole))
    assert (partial.whole, partial.handoffs, partial.seconds) == (
        again.whole,
        again.handoffs,
        pytest.approx(again.seconds),
    )
