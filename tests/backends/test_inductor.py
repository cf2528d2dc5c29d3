"""The inductor backend on the CPU: compile a partition, load it, match eager; and its
CUDA-graph twin `inductor-cudagraphs`: registered for GPUs, its options, what it refuses,
and that it runs uncaptured where there is no CUDA (tests/gpu/ checks its replays)."""

from __future__ import annotations

import importlib
import json
import logging
import os
from pathlib import Path

import pytest
import torch
from block_units import Block, unit_of

from hetero.backends.base import Artifact, CompileOptions
from hetero.backends.cudagraphs import replayed
from hetero.backends.inductor import InductorBackend, InductorGraphsBackend
from hetero.backends.registry import default_registry
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError

CPU = DeviceSpec("test/cpu0", "cpu", "test", cores=2)


def test_registry_builds_it():
    b = default_registry().get("inductor")
    assert isinstance(b, InductorBackend) and set(b.device_kinds) == {"cpu", "gpu"}


@pytest.mark.slow
def test_cpu_partition_matches_eager(tmp_path):
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 16)
    backend = InductorBackend()
    man = backend.compile(unit_of(model, x), CPU, CompileOptions(), tmp_path)
    assert set(man.files) == {"program.pt2", "inductor.json"}
    run = backend.load(Artifact("inductor", "k", tmp_path, {}), CPU)
    (got,) = run(x)
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_a_loaded_program_is_compiled_before_its_first_call(tmp_path):
    """Inductor compiles on a program's first call: load makes that call (on the program's
    example inputs), so the first request of a compiled model runs at speed."""
    from torch._dynamo.utils import counters

    torch.manual_seed(7)
    model, x = Block(), torch.randn(5, 16)
    backend = InductorBackend()
    backend.compile(unit_of(model, x), CPU, CompileOptions(), tmp_path)
    counters.clear()
    run = backend.load(Artifact("inductor", "k", tmp_path, {}), CPU)
    compiled = counters["stats"]["unique_graphs"]
    assert compiled >= 1
    (got,) = run(x)
    assert counters["stats"]["unique_graphs"] == compiled  # nothing compiled at the call
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_unknown_mode_is_refused(tmp_path):
    model, x = Block(), torch.randn(3, 16)
    with pytest.raises(CompileError, match="reduce-overhead"):
        InductorBackend().compile(
            unit_of(model, x), CPU, CompileOptions(extra=(("mode", "fastest"),)), tmp_path
        )


# ---- inductor-cudagraphs: Inductor's artifact replayed through hetero's CUDA graphs ----------
GPU = DeviceSpec("test/gpu0", "gpu", "test", index=0)


def test_inductor_cudagraphs_is_a_gpu_candidate():
    reg = default_registry()
    b = reg.get("inductor-cudagraphs")
    assert isinstance(b, InductorGraphsBackend) and b.device_kinds == ("gpu",)
    assert "inductor-cudagraphs" in reg.for_kind("gpu")
    assert "inductor-cudagraphs" not in reg.for_kind("cpu")
    assert not b.holds_state  # a graph replays fixed addresses: no streamed weights


@pytest.mark.parametrize(
    "asked, compiled",
    [
        (None, None),
        ("default", None),
        ("reduce-overhead", None),
        ("max-autotune", "max-autotune-no-cudagraphs"),
        ("max-autotune-no-cudagraphs", "max-autotune-no-cudagraphs"),
    ],
)
def test_inductor_cudagraphs_compiles_without_inductors_own_graphs(asked, compiled):
    # a graph captured inside Inductor's own would fail: the mode asked loses its graphs
    b = InductorGraphsBackend()
    options = CompileOptions(extra=(("mode", asked),))
    assert b.mode(options) == compiled
    assert b.target(GPU, options) == f"inductor-cudagraphs:gpu:any:{compiled or 'default'}"


def test_inductor_cudagraphs_writes_the_mode_without_graphs(tmp_path):
    model, x = Block(), torch.randn(3, 16)
    options = CompileOptions(extra=(("mode", "max-autotune"),))
    InductorGraphsBackend().compile(unit_of(model, x), GPU, options, tmp_path)
    settings = json.loads((tmp_path / "inductor.json").read_text())
    assert settings["mode"] == "max-autotune-no-cudagraphs"


@pytest.mark.parametrize(
    "options, match",
    [
        (CompileOptions(dynamic=True), "static shapes"),
        (CompileOptions(extra=(("weights", "streamed"),)), "streamed or bound weights"),
        (CompileOptions(extra=(("mode", "fastest"),)), "unknown torch.compile mode"),
    ],
)
def test_inductor_cudagraphs_refuses_what_a_graph_cannot_replay(tmp_path, options, match):
    model, x = Block(), torch.randn(3, 16)
    with pytest.raises(CompileError, match=match):
        InductorGraphsBackend().compile(unit_of(model, x), GPU, options, tmp_path)


def test_inductor_cudagraphs_replays_each_load_once(monkeypatch):
    """The measured choice loads a candidate whose compile was warmed in another process
    through `load_warmed`, the stage it chose through `load`: `inductor-cudagraphs` must
    replay its graphs in both, once. Twice, the inner capture fails inside the outer one and
    both run plain Inductor (MobileNetV3-L's chosen stage, run 47: 2.83 ms where the choice
    timed 0.93)."""
    from hetero.backends import cudagraphs

    monkeypatch.setattr(InductorBackend, "_load", lambda self, art, dev, ready: "plain")
    monkeypatch.setattr(cudagraphs, "replayed", lambda run, device: ("replayed", run))
    backend = InductorGraphsBackend()
    assert backend.load_warmed(None, GPU, lambda: True) == ("replayed", "plain")
    assert backend.load(None, GPU) == ("replayed", "plain")


def test_a_replayed_run_is_not_replayed_again(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    once = replayed(lambda *acts: acts, GPU)
    assert once.replays and replayed(once, GPU) is once


def test_without_cuda_the_replay_is_the_plain_run(monkeypatch):
    def run(*acts):
        return acts

    assert replayed(run, CPU) is run
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert replayed(run, GPU) is run


@pytest.mark.slow
def test_inductor_cudagraphs_matches_eager_where_it_cannot_capture(tmp_path):
    # on a CPU the artifact loads as plain Inductor: the fallback the GPU path takes for a
    # partition that cannot be captured
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 16)
    backend = InductorGraphsBackend()
    backend.compile(unit_of(model, x), CPU, CompileOptions(), tmp_path)
    run = backend.load(Artifact("inductor-cudagraphs", "k", tmp_path, {}), CPU)
    with torch.no_grad():
        torch.testing.assert_close(run(x)[0], model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_inductor_candidates_of_one_partition_share_one_compile(tmp_path, monkeypatch):
    # the measured choice loads both; Inductor's compile is the cost, the capture is not
    from hetero.backends.cache import ArtifactCache

    compiles = []
    real = torch.compile

    def counting(*a, **k):
        compiles.append(k.get("mode"))
        return real(*a, **k)

    monkeypatch.setattr(torch, "compile", counting)
    torch.manual_seed(0)
    model, x = Block(), torch.randn(3, 16)
    unit, cache = unit_of(model, x), ArtifactCache(tmp_path)
    runs = [
        b.load(cache.build(b, unit, CPU, CompileOptions()), CPU)
        for b in (InductorBackend(), InductorGraphsBackend())
    ]
    assert len(compiles) == 1
    with torch.no_grad():
        want = model(x)
        for run in runs:
            torch.testing.assert_close(run(x)[0], want, rtol=1e-4, atol=1e-5)
    other = CompileOptions(extra=(("mode", "max-autotune-no-cudagraphs"),))
    InductorBackend().load(cache.build(InductorBackend(), unit, CPU, other), CPU)
    assert len(compiles) == 2  # other settings: compiled apart


@pytest.fixture(scope="module")
def warming_cache(tmp_path_factory):
    """One Inductor cache, new each session, for both warming cases: a fresh cache costs each
    process that compiles into it Inductor's probes of the CPU's vector instructions (a test
    program compiled per instruction set: ~6 s of g++ on the 2-core box, 2026-12-06), made
    here once for both. No graph is shared: each case compiles its own input size."""
    return tmp_path_factory.mktemp("inductor-cache")


@pytest.mark.slow
@pytest.mark.parametrize("standby", [False, True])
def test_a_warming_process_leaves_the_compile_in_inductors_cache(
    tmp_path, monkeypatch, standby, warming_cache, caplog
):
    """backends/warming.py: another process compiles the artifact; this process's load then
    reads Inductor's FX graph cache instead of compiling. Also where the process was started
    ahead (`stand_by`), before the artifact existed. The log says when the process reached
    each step, its work done among them (where the wait ends)."""
    from torch._dynamo.utils import counters

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(warming_cache))
    torch.manual_seed(3)
    # a size of each case's own (static shapes: a graph per size), so that the cache the two
    # share holds no entry for this case's program until its own warming writes one
    model, x = Block(), torch.randn(5 if standby else 4, 16)
    backend = InductorBackend()
    assert backend.can_warm(CPU)
    ahead = backend.stand_by(CPU) if standby else None
    backend.compile(unit_of(model, x), CPU, CompileOptions(), tmp_path / "a")
    artifact = Artifact("inductor", "k", tmp_path / "a", {})
    warming = backend.start_warming(artifact, CPU, ahead)
    if ahead is not None:
        assert ahead.start(["taken"]) is None  # the warming runs in the standby's process
    assert warming is not None
    torch._dynamo.reset()  # nothing of this process's earlier compiles
    counters.clear()
    traced_before_ready = []

    def ready() -> bool:
        traced_before_ready.append(counters["stats"]["calls_captured"])
        return warming.wait(timeout_s=300)

    # the load reads and traces the program while the warming runs, waits right before
    # Inductor compiles, then finds the warming's compile in the cache
    with caplog.at_level(logging.INFO, logger="hetero.backends.warming"):
        (got,) = backend.load_warmed(artifact, CPU, ready)(x)
    assert len(traced_before_ready) == 1 and traced_before_ready[0] > 0 and warming.wait()
    (line,) = [r.getMessage() for r in caplog.records if "its process" in r.getMessage()]
    steps = ["handed over", "imported", "read", "done", *(["ready"] if standby else [])]
    assert all(f"{step} +" in line for step in steps), line
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


class _LibraryOperator(torch.nn.Module):
    """Calls a library's operator (tests/backends/library_op.py), which only a process that
    imported its module can read from a saved program, as Mixtral's MoE called transformers'."""

    def __init__(self) -> None:
        super().__init__()
        importlib.import_module("library_op")  # registers it here
        self.w = torch.nn.Parameter(torch.randn(16))

    def forward(self, x):
        return torch.ops.hetero_test.scaled_add(x, self.w).relu() * 2.0


@pytest.mark.slow
@pytest.mark.parametrize("imported", [False, True])
def test_a_warming_imports_the_modules_that_define_the_programs_library_operators(
    tmp_path, monkeypatch, imported, warming_cache
):
    """A fresh process cannot read a program that calls a library's operator until the
    module registering it is imported (the Mixtral row's warming failed so, and its compile
    missed Inductor's cache: backend_suite.md, run 48); with the modules handed over, the
    warming compiles and the load hits its cache."""
    from torch._dynamo.utils import counters

    from hetero.backends.library_ops import defining_modules

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(warming_cache))
    here = str(Path(__file__).parent)  # where the warming finds library_op.py
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([here, os.environ.get("PYTHONPATH", "")]))
    model, x = _LibraryOperator().eval(), torch.randn(6 if imported else 7, 16)
    unit = unit_of(model, x)
    backend = InductorBackend()
    backend.compile(unit, CPU, CompileOptions(), tmp_path / "a")
    artifact = Artifact("inductor", "k", tmp_path / "a", {})
    modules = defining_modules(unit.module.graph) if imported else ()
    assert not imported or modules == ("library_op",)
    warming = backend.start_warming(artifact, CPU, None, modules)
    assert warming is not None
    assert warming.wait(timeout_s=300) is imported
    torch._dynamo.reset()
    counters.clear()
    (got,) = backend.load_warmed(artifact, CPU, warming.wait)(x)
    assert (counters["inductor"]["fxgraph_cache_hit"] >= 1) is imported
    with torch.no_grad():
        torch.testing.assert_close(got, model(x), rtol=1e-4, atol=1e-5)


def test_no_warming_where_inductors_caches_are_off_or_on_a_gpu_this_process_lacks():
    from torch._inductor import config

    gpu = DeviceSpec("test/gpu0", "gpu", "test", index=torch.cuda.device_count())
    assert not InductorBackend().can_warm(gpu)
    assert not InductorBackend().stand_by(gpu)
    with config.patch(force_disable_caches=True):
        assert not InductorBackend().can_warm(CPU)
    assert InductorBackend().can_warm(CPU)
