"""The Triton backend's contract: artifact files, readable source, errors, a whole model."""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

import json

import pytest
import torch
from triton_models import GPU, LinearEpilogue, assert_close, build, gpt2, unit_of

from hetero.backends.base import Artifact, CompileOptions
from hetero.backends.registry import default_registry
from hetero.backends.triton import TritonBackend
from hetero.backends.triton.backend import FILES
from hetero.errors import CompileError, WorkerError


def test_registry_builds_it():
    b = default_registry().get("triton")
    assert isinstance(b, TritonBackend) and b.device_kinds == ("gpu",)
    assert b.available()


def test_artifact_holds_readable_source_weights_and_plan(tmp_path):
    model = LinearEpilogue("tanh")
    _, man = build(TritonBackend(), model, (torch.randn(2, 32),), tmp_path)
    out = tmp_path / "artifact"
    assert set(man.files) == set(FILES)
    src = (out / "program.py").read_text()
    assert "@triton.jit" in src and "def forward(" in src and "tl.dot" in src
    assert "addmm" in (out / "fusion.txt").read_text()
    config = json.loads((out / "triton.json").read_text())
    assert {k["kind"] for k in config["kernels"]} == {"matmul"}
    assert man.target.endswith(":interpret")


def test_identical_layers_share_one_kernel(tmp_path):
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = LinearEpilogue("tanh"), LinearEpilogue("tanh")

        def forward(self, x):
            return self.b(self.a(x))

    build(TritonBackend(), Twice(), (torch.randn(2, 32),), tmp_path)
    config = json.loads((tmp_path / "artifact" / "triton.json").read_text())
    assert len(config["kernels"]) == 2  # up+gelu and down+residual, each launched twice
    assert all(k["uses"] == 2 for k in config["kernels"])


def test_dynamic_shapes_are_refused_with_a_way_out(tmp_path):
    unit = unit_of(LinearEpilogue(), torch.randn(2, 32))
    with pytest.raises(CompileError, match="inductor"):
        TritonBackend().compile(unit, GPU, CompileOptions(dynamic=True), tmp_path)


def test_load_without_cuda_or_interpreter_says_what_to_do(monkeypatch):
    from hetero.backends.triton.backend import run_device

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(WorkerError, match="TRITON_INTERPRET"):
        run_device(GPU)


def test_gpt2_matches_eager(tmp_path):
    model = gpt2(layers=1, dim=32, heads=2, vocab=64, ctx=16)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        want = model(ids).last_hidden_state
    run, _ = build(TritonBackend(), model, (ids,), tmp_path)
    (got,) = run(ids)
    assert_close(got, want, torch.float32)
    plan = (tmp_path / "artifact" / "fusion.txt").read_text()
    assert "attention" in plan and "matmul" in plan and "rowwise" in plan


def test_tune_cache_round_trips_per_gpu_model(tmp_path):
    from hetero.backends.triton.autotune import TuneCache, cache_file

    path = cache_file(tmp_path, "NVIDIA H100 80GB HBM3")
    assert path.name == "nvidia-h100-80gb-hbm3.json"
    cache = TuneCache(path)
    assert cache.read() == {}
    cache.write({"k1": {"BLOCK_M": 64}})
    cache.write({"k2": {"BLOCK_M": 128}})
    assert cache.read() == {"k1": {"BLOCK_M": 64}, "k2": {"BLOCK_M": 128}}


def test_precompile_threads_yield_the_cores_and_the_caller_keeps_its_priority():
    import os
    import threading

    from hetero.backends.triton.autotune import YIELD_NICE, _yield_cores

    mine = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen = []

    def worker():
        _yield_cores()
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen == [max(YIELD_NICE, mine)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == mine


def test_small_matmuls_try_only_tiles_that_fit():
    from hetero.backends.triton.autotune import candidates
    from hetero.backends.triton.codegen import Kernel

    small = candidates(Kernel("mm", "matmul", "k", 1, space=(1, 64, 768)))
    big = candidates(Kernel("mm", "matmul", "k", 1, space=(1, 4096, 3072)))
    assert small and all(c["BLOCK_M"] <= 64 for c in small)
    assert len(big) > len(small)


def test_dtype_option_casts_weights_and_inputs(tmp_path):
    model = LinearEpilogue("tanh")
    x = torch.randn(2, 32)
    with torch.no_grad():
        want = model(x)
    run, _ = build(TritonBackend(), model, (x,), tmp_path, CompileOptions(dtype="float16"))
    (got,) = run(x.half())
    assert got.dtype == torch.float16  # (the model's .to(float32) was a no-op at capture)
    assert_close(got, want, torch.float16)


class _MergeHeads(torch.nn.Module):
    """Attention's output merge then a projection: [b, h, s, d] -> [b, s, h*d] @ W."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2).contiguous()
        return self.proj(y.view(y.shape[0], y.shape[1], -1))


def test_a_view_traced_on_another_layout_compiles_and_runs(tmp_path):
    """Traced where attention's output was laid out [b, s, h, d] (the host's kernel: the
    trace keeps a bare `view`), compiled and run where it is dense [b, h, s, d] (torch
    2.11's SDPA on an H200 stopped a LLaMA's compile at that view)."""
    import dataclasses

    model = _MergeHeads()
    seq_major = torch.randn(2, 5, 4, 2).transpose(1, 2)
    dense = torch.randn(2, 4, 5, 2)
    unit = unit_of(model, seq_major)
    assert any(n.target == torch.ops.aten.view.default for n in unit.module.graph.nodes)
    unit = dataclasses.replace(unit, example_inputs=(dense,))
    out = tmp_path / "artifact"
    TritonBackend().compile(unit, GPU, CompileOptions(), out)
    runner = TritonBackend().load(Artifact("triton", "views", out, {}), GPU)
    with torch.no_grad():
        for x in (dense, seq_major):
            (got,) = runner(x)
            assert_close(got, model(x), torch.float32)


_LIB = torch.library.Library("hetero_triton_test", "DEF")  # held: the op lives as long as it
_LIB.define("scaled(Tensor x, float s) -> Tensor")
_LIB.impl("scaled", lambda x, s: x * s, "CompositeExplicitAutograd")
_LIB.impl("scaled", lambda x, s: torch.empty_like(x), "Meta")


class _LibraryOp(torch.nn.Module):
    """A library's own operator between two matmuls (transformers' Mixtral calls
    `transformers::grouped_mm_fallback` where torch has no grouped matmul)."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.ops.hetero_triton_test.scaled(self.a(x), 3.0))


def test_a_library_operator_is_called_in_its_own_namespace(tmp_path):
    model = _LibraryOp()
    x = torch.randn(4, 8)
    run, _ = build(TritonBackend(), model, (x,), tmp_path)
    assert (
        "torch.ops.hetero_triton_test.scaled" in (tmp_path / "artifact" / "program.py").read_text()
    )
    with torch.no_grad():
        assert_close(run(x)[0], model(x), torch.float32)


class _Experts(torch.nn.Module):
    """A mixture of experts' core as transformers runs it for 16-bit weights: rows sorted by
    expert, then its host-looped grouped product (rewritten to hetero::grouped_mm in the
    partition the backend compiles: backends/substitutes.py)."""

    def __init__(self) -> None:
        super().__init__()
        import transformers.integrations.moe  # noqa: F401  (registers the operator)

        self.up = torch.nn.Linear(16, 16)
        self.w = torch.nn.Parameter(torch.randn(3, 16, 8) / 4)
        self.register_buffer("offs", torch.tensor([2, 2, 9]))

    def forward(self, x):
        h = self.up(x).relu()
        return torch.ops.transformers.grouped_mm_fallback(h, self.w, self.offs) + 1.0


def test_a_library_loop_rewritten_to_heteros_operator_runs_between_fused_kernels(tmp_path):
    pytest.importorskip("transformers")
    model, x = _Experts().eval(), torch.randn(11, 16)
    targets = {n.target for n in unit_of(model, x).module.graph.nodes}
    assert torch.ops.hetero.grouped_mm.default in targets
    run, _ = build(TritonBackend(), model, (x,), tmp_path)
    with torch.no_grad():
        assert_close(run(x)[0], model(x), torch.float32)
