"""runtime/stage_warming.py and runtime/stage_compile.py: a generation stage's Inductor
compile made in another process, found in the cache by the binding process's own."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.phases import PROMPT, START, Phase
from hetero.runtime.generation import StageBinder, lm_weights
from hetero.runtime.stage_compile import (
    CompileMode,
    InductorStage,
    canonical_strides,
    compile_mode,
    on_device,
    row_major,
)
from hetero.runtime.stage_warming import COMPILED, MOST, StageWarmings, stage_spec

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def built(tiny_llama_lm, tmp_path_factory):
    """The tiny LLaMA's stages on the 2-core cluster, built fresh (each holds its program)."""
    from hetero.partitioner.algorithms.generation import plan_generation
    from hetero.runtime.generation_build import compile_generation

    cluster = ClusterSpec.from_yaml("configs/clusters/cpu-2core.yaml")
    registry = default_registry()
    plan = plan_generation(tiny_llama_lm, cluster, registry=registry)
    cache = tmp_path_factory.mktemp("stages")
    return compile_generation(tiny_llama_lm, plan, cluster, cache, registry=registry)


def _every_device() -> StageWarmings:
    """Warmings that take this CPU's stages as a GPU binder takes its own (`compile_mode`):
    the binder compiles only a GPU's stages through InductorStage, but the compile and its
    cache are the same on a CPU."""
    return StageWarmings(compile_mode, lambda d: CPU)


@pytest.mark.slow
def test_a_warmed_decode_stage_compiles_from_the_cache_the_warming_left(
    tiny_llama_lm, built, tmp_path, monkeypatch
):
    """The warming compiles the decode program on zeros laid out as traced; the binder's
    compile, on the real weights (bound as a store binds them) and a token id that arrives
    as a slice, waits for it and finds its graph in Inductor's cache, and computes what the
    program computes."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    stages = built[Phase.DECODE]
    s = stages[0]
    warmings = _every_device()
    try:
        warmings.start(Phase.DECODE, stages)
        ready = warmings.ready(s, CPU, CompileMode.STATIC)
        assert ready is not None
        torch._dynamo.reset()
        counters.clear()
        weights = lm_weights(tiny_llama_lm)
        ids = torch.randint(0, 512, (1, 8))[:, -1:]  # strides (8, 1): not as traced
        acts = {PROMPT: ids, START: torch.tensor(20)}
        args = [acts[n] for n in s.inputs] + [weights[n].detach().clone() for n in s.params]
        module = on_device(s.program, CPU)
        stage = InductorStage(module, dynamic_dims=(), name=s.name, ready=ready)
        with torch.inference_mode():
            got = stage(*args)
            want = module(*[a.clone() for a in args])
        assert ready() is True  # the warming finished its compile
        assert stage.failed is None
        assert counters["inductor"]["fxgraph_cache_hit"] >= 1
        assert counters["inductor"]["fxgraph_cache_miss"] == 0
        torch.testing.assert_close(got, want)
    finally:
        warmings.close()


def test_a_spec_lays_each_input_out_as_the_binders_call_does(tiny_llama_lm, built):
    """Inputs whose sizes run outermost first are laid out as fresh tensors (the binder's
    call makes them so: `canonical_strides`), prefill's prompt length is its example's and
    kept symbolic, and a program read back from the cache (none in memory) gets no spec."""
    prefill = built[Phase.PREFILL][0]
    made = stage_spec(prefill, CPU, CompileMode.DYNAMIC)
    assert made is not None
    spec, nbytes = made
    assert spec["program"].endswith("program.pt2")
    k = prefill.inputs.index(PROMPT)
    assert spec["dynamic_dims"] == [[k, 1]]
    shape, stride, dtype = spec["inputs"][k]
    assert dtype == "int64" and shape[1] >= 2 and stride == [shape[1], 1]
    weights = lm_weights(tiny_llama_lm)
    assert nbytes >= sum(weights[n].numel() * weights[n].element_size() for n in prefill.params)
    decode = built[Phase.DECODE][0]
    static = stage_spec(decode, CPU, CompileMode.STATIC)
    assert static is not None and static[0]["dynamic_dims"] == []
    assert stage_spec(dataclasses.replace(decode, program=None), CPU, CompileMode.STATIC) is None


def test_only_compiled_gpu_stages_are_warmed(built):
    """The binder compiles only a GPU's stages through InductorStage (`StageBinder.run_mode`,
    which the warmings ask): nothing else starts a warming."""
    registry = default_registry()
    decode = built[Phase.DECODE]
    s = decode[0]
    on_cpu = StageBinder(registry, device_of=lambda d: CPU)
    assert on_cpu.run_mode(Phase.DECODE, s, decode) not in COMPILED
    warmings = StageWarmings(on_cpu.run_mode, on_cpu.device_of)
    warmings.start(Phase.DECODE, decode)
    assert warmings.ready(s, CPU, CompileMode.STATIC) is None
    gpu = torch.device("cuda", 0)
    assert (
        StageBinder(registry, device_of=lambda d: gpu).run_mode(Phase.DECODE, s, decode) in COMPILED
    )
    unwanted = StageBinder(registry, device_of=lambda d: gpu, compile_gpu=False)
    assert unwanted.run_mode(Phase.DECODE, s, decode) not in COMPILED
    streamed = [dataclasses.replace(p, weights="streamed") for p in built[Phase.PREFILL]]
    op_by_op = StageBinder(registry, device_of=lambda d: gpu).run_mode(
        Phase.PREFILL, streamed[0], streamed
    )
    assert op_by_op is CompileMode.OP_BY_OP and op_by_op not in COMPILED


def test_no_more_than_most_warmings_start_in_a_build(built, monkeypatch):
    import hetero.runtime.stage_warming as stage_warming

    assert MOST >= 2  # prefill's and decode's side by side
    monkeypatch.setattr(stage_warming, "MOST", 1)
    warmings = _every_device()
    try:
        warmings.start(Phase.PREFILL, built[Phase.PREFILL])
        warmings.start(Phase.DECODE, built[Phase.DECODE])
        prefill, decode = built[Phase.PREFILL][0], built[Phase.DECODE][0]
        assert warmings.ready(prefill, CPU, CompileMode.DYNAMIC) is not None
        assert warmings.ready(decode, CPU, CompileMode.STATIC) is None
    finally:
        warmings.close()  # stops the one started


def test_canonical_strides_make_row_major_layouts_fresh_and_leave_others():
    base = torch.arange(64).reshape(2, 32)
    sliced = base[:, -1:]
    assert sliced.stride() == (32, 1)
    fresh = canonical_strides(sliced)
    assert fresh.stride() == (1, 1) and torch.equal(fresh, sliced)
    odd = torch.arange(8).reshape(8, 1).as_strided((8, 1), (1, 7))  # contiguous, odd stride
    view = canonical_strides(odd)
    assert view.stride() == (1, 1) and view.data_ptr() == odd.data_ptr()
    transposed = torch.randn(4, 3).t()
    assert canonical_strides(transposed) is transposed
    plain = torch.randn(3, 4)
    assert canonical_strides(plain) is plain
    assert canonical_strides(5) == 5
    assert row_major((2, 1), (32, 1)) and row_major((4, 3), (3, 1))
    assert not row_major((3, 4), (1, 3)) and not row_major((4, 3), (0, 1))
