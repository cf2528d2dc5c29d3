"""Streamed weights: the WeightStreamer's slot logic, and a plan with streamed partitions
run end to end on the CPU (the GPU's stages mapped to the CPU; the streamer then hands
out host tensors, and every other step — pieces, artifacts with weights as inputs, the
shared streamer per device — is the one the GPU runs)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from hetero import plan as make_plan
from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.graph import capture
from hetero.runtime.build import compile_plan, needed_outputs
from hetero.runtime.executor import LocalExecutor
from hetero.runtime.streaming import STREAMED, StreamedRunner, piece_assignment
from hetero.runtime.weight_stream import WeightStreamer
from hetero.runtime.worker import DeviceWorker, caller_packet

# ---- WeightStreamer ------------------------------------------------------------------------


def _items(n: int) -> list[dict[str, torch.Tensor]]:
    return [{"w": torch.full((3, 2), float(i)), "b": torch.arange(i + 1.0)} for i in range(n)]


@pytest.mark.parametrize(("n", "slots"), [(1, 2), (2, 2), (3, 2), (5, 2), (4, 3), (3, 1)])
def test_streamer_hands_out_each_items_weights_over_several_requests(n, slots):
    items = _items(n)
    s = WeightStreamer(items, device="cpu", slots=slots)
    assert s.slots == min(slots, n) and s.device_bytes == 0  # no CUDA: nothing on a device
    for _ in range(3):  # requests: the wrap-around prefetch must not disturb the next one
        for i in range(n):
            w, b = s.acquire(i)
            assert torch.equal(w, items[i]["w"]) and torch.equal(b, items[i]["b"])
            held = s._slot_of(i)
            assert held in s.busy
            s.release(i)
            assert held not in s.busy


def test_streamer_never_overwrites_a_slot_in_use_or_not_yet_used():
    s = WeightStreamer(_items(3), device="cpu", slots=2)
    s.acquire(0)  # item 1 is prefetched into the other slot
    assert sorted(x for x in s.tenant if x is not None) == [0, 1]
    s.prefetch(2)  # both slots taken (0 in use, 1 not used yet): nothing may move
    assert s._slot_of(2) is None and s._slot_of(0) is not None and s._slot_of(1) is not None
    s.release(0)  # slot of 0 frees up: item 2 goes there, item 1 stays
    assert s._slot_of(2) is not None and s._slot_of(1) is not None
    s.acquire(1)
    s.release(1)  # wrap-around: item 0 (the next request's first) takes the freed slot
    assert s._slot_of(0) is not None and s._slot_of(2) is not None
    # an odd number of items still keeps item 2 where it is while it runs
    s.acquire(2)
    assert s.tenant[s._slot_of(2)] == 2 and s._slot_of(0) is not None


def test_streamer_out_of_order_acquire_evicts_an_idle_slot():
    s = WeightStreamer(_items(4), device="cpu", slots=2)
    s.acquire(0)
    s.release(0)
    w, _ = s.acquire(3)  # not the expected next item: it still gets a slot
    assert torch.equal(w, _items(4)[3]["w"])
    with pytest.raises(IndexError):
        s.acquire(7)


def test_streamer_slots_hold_the_largest_item():
    items = [{"a": torch.zeros(10)}, {"a": torch.zeros(100), "b": torch.zeros(3)}]
    s = WeightStreamer(items, device="cpu")
    assert s.item_bytes == [40, 412]
    assert s.slot_bytes >= 412 and s.slot_bytes % 256 == 0
    with pytest.raises(ValueError, match="at least one slot"):
        WeightStreamer(items, device="cpu", slots=0)


# ---- a plan with streamed partitions, run on the CPU ------------------------------------


def _tiny_llama():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=64,
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    return model, (torch.randint(0, 128, (2, 8)),)


def _gpu_box(weight_bytes: int) -> ClusterSpec:
    """A GPU capped below the model's weights, next to its host's CPU."""
    return ClusterSpec.from_dict(
        {
            "name": "capped-gpu",
            "hosts": [
                {
                    "name": "node0",
                    "devices": [
                        {
                            "name": "gpu",
                            "kind": "gpu",
                            "peak_flops": {"float32": "60 TFLOPS"},
                            "bandwidth": "3 TB/s",
                            "memory": int(weight_bytes * 0.6),
                        },
                        {
                            "name": "cpu",
                            "kind": "cpu",
                            "cores": 2,
                            "bandwidth": "20 GB/s",
                            "memory": "4 GB",
                        },
                    ],
                    "links": [{"between": ["gpu", "cpu"], "bandwidth": "50 GB/s"}],
                }
            ],
        }
    )


@pytest.fixture(scope="module")
def streamed_llama(tmp_path_factory):
    model, x = _tiny_llama()
    graph = capture(model, x)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    cluster = _gpu_box(weight_bytes)
    # the CPU only hosts the weights: every group computes on the GPU, resident or streamed
    plan = make_plan(graph, cluster, backends={"gpu": "eager"}, exclude=["node0/cpu"])
    stages = compile_plan(
        graph, plan, cluster, tmp_path_factory.mktemp("streamed"), registry=default_registry()
    )
    with torch.no_grad():
        expected = model(*x).logits
    return graph, plan, stages, x, expected


def _on_cpu(stages):
    """The same stages, run by this process's CPU (no GPU here)."""
    cpu = ClusterSpec.from_dict(
        {
            "name": "cpu",
            "hosts": [
                {
                    "name": "node0",
                    "devices": [
                        {"name": "cpu", "kind": "cpu", "memory": "4 GB", "bandwidth": "20 GB/s"}
                    ],
                }
            ],
        }
    ).device("node0/cpu")
    return [replace(s, device=cpu) for s in stages]


def test_plan_streams_and_pieces_follow_groups(streamed_llama):
    graph, plan, stages, _, _ = streamed_llama
    streamed = [p for p in plan.partitions if p.weights == STREAMED]
    assert streamed, plan.explain()
    pieces = [s for s in stages if s.weights == STREAMED]
    # one piece per parameter-holding group, each an eager artifact with weights as inputs
    assert len(pieces) >= len(streamed)
    assert {s.backend for s in pieces} == {"eager"}
    assert all(s.params and "weights.safetensors" in s.artifact.files for s in pieces)
    assert {s.plan_index for s in pieces} == {p.index for p in streamed}
    assert len({s.index for s in stages}) == len(stages)
    for p in streamed:
        mine = [s for s in pieces if s.plan_index == p.index]
        assert [s.piece for s in mine] == list(range(len(mine)))
        assert sorted(n for s in mine for n in s.nodes) == sorted(p.nodes)
    resident = [s for s in stages if s.weights != STREAMED]
    assert all(not s.params and s.partition is None for s in resident)
    assignment, where = piece_assignment(graph, plan)
    assert set(assignment) == set(plan.assignment())
    assert len(where) == len(stages)


def test_streamed_plan_matches_eager(streamed_llama):
    graph, plan, stages, x, expected = streamed_llama
    with LocalExecutor(_on_cpu(stages), needed_outputs(graph), plan=plan) as ex:
        assert set(ex.streamers) == {"node0/cpu"}
        streamer = ex.streamers["node0/cpu"]
        assert len(streamer) == sum(s.weights == STREAMED for s in stages)
        inputs = dict(zip(graph.inputs, x, strict=True))
        for _ in range(2):  # the second request starts from the wrap-around prefetch
            out = ex.run(inputs)
            (got,) = out.values()
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
        measured = ex.measured_ms()
        assert set(measured) == {p.index for p in plan.partitions}


def test_device_worker_runs_streamed_stages(streamed_llama):
    graph, _, stages, x, expected = streamed_llama
    local = _on_cpu(stages)
    worker = DeviceWorker(local[0].device, local)
    assert any(isinstance(r.runner, StreamedRunner) for r in worker.stages.values())
    packets = {-1: caller_packet(dict(zip(graph.inputs, x, strict=True)))}
    from hetero.runtime.stage import producers, sources

    made_by = producers(local)
    for s in local:
        ins = [packets[src] for src in sources(s, made_by)]
        packets[s.index] = worker.run(s.index, True, *ins)
    out = {k: v for p in packets.values() for k, v in p.values.items()}
    (name,) = needed_outputs(graph)
    torch.testing.assert_close(out[name], expected, rtol=1e-4, atol=1e-4)


def test_pieces_with_one_program_share_one_compiled_module(streamed_llama, monkeypatch):
    """stream_runner="inductor": decoder layers' pieces share a compiled program; a failing
    compile falls back to eager (torch.compile stubbed: no C++ toolchain needed here)."""
    graph, plan, stages, x, expected = streamed_llama
    compiled = []

    def fake_compile(module, **kwargs):
        compiled.append(module)
        calls = []

        def run(*args):
            calls.append(1)
            if len(compiled) % 2:  # every other program "fails to compile"
                raise RuntimeError("inductor: unsupported op (stub)")
            return module(*args)

        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    local = _on_cpu(stages)
    with LocalExecutor(local, needed_outputs(graph), plan=plan, stream_runner="inductor") as ex:
        (got,) = ex.run(dict(zip(graph.inputs, x, strict=True))).values()
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    pieces = sum(s.weights == STREAMED for s in stages)
    assert 0 < len(compiled) < pieces  # same-program pieces (one per layer) share a module


def test_program_key_ignores_names_but_not_shapes(streamed_llama):
    from pathlib import Path

    from hetero.runtime.streaming import program_key

    graph, _, stages, _, _ = streamed_llama
    keys = {}
    for s in stages:
        if s.weights == STREAMED:
            ep = torch.export.load(Path(s.artifact.path) / "program.pt2")
            keys.setdefault(program_key(ep), []).append(s.name)
    assert any(len(v) > 1 for v in keys.values())  # layers repeat
    assert len(keys) > 1  # q_proj and o_proj pieces differ (shapes) from the layernorms
    with pytest.raises(Exception, match="stream_runner"):
        LocalExecutor(_on_cpu(stages), needed_outputs(graph), stream_runner="tvm")
