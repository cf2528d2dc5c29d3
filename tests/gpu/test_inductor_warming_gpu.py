"""Inductor's compile warmed in another process on a GPU: the warming compiles the program
and launches it once in its turn on the card, and this process's load finds the compile in
Inductor's caches and its kernels' configs already timed. Through the measured choice,
`inductor` and `inductor-cudagraphs` share one warming.

Skipped where CUDA is absent. Run: pytest tests/gpu/test_inductor_warming_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _unit():
    from block_units import unit_of

    from hetero.interfaces.models import mlp_block

    model, (x,) = mlp_block(batch=8, seq=64)
    model, x = model.half().cuda().eval(), x.half().cuda()
    return model, x, unit_of(model, x)


@pytest.mark.parametrize("standby", [False, True])
def test_a_gpu_warming_leaves_the_compile_in_inductors_cache(tmp_path, monkeypatch, standby):
    from torch._dynamo.utils import counters

    from hetero.backends.base import Artifact, CompileOptions
    from hetero.backends.inductor import InductorBackend
    from hetero.cluster.spec import ClusterSpec

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache" / "triton"))
    model, x, unit = _unit()
    gpu = next(d for d in ClusterSpec.local().devices if d.kind == "gpu")
    backend = InductorBackend()
    assert backend.can_warm(gpu)
    ahead = backend.stand_by(gpu) if standby else None
    backend.compile(unit, gpu, CompileOptions(dtype="float16"), tmp_path / "a")
    artifact = Artifact("inductor", "k", tmp_path / "a", {})
    warming = backend.start_warming(artifact, gpu, ahead)
    assert warming is not None and warming.wait(timeout_s=300)
    torch._dynamo.reset()
    counters.clear()
    (got,) = backend.load_warmed(artifact, gpu, warming.wait)(x)
    assert counters["inductor"]["fxgraph_cache_hit"] >= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == 0
    with torch.no_grad():
        want = model(x)
    err = float((got.float() - want.float()).norm() / want.float().norm())
    assert err < 1e-2


def test_no_gpu_warming_for_a_mode_that_tunes_while_compiling(tmp_path):
    from hetero.backends.base import Artifact, CompileOptions
    from hetero.backends.inductor import InductorBackend
    from hetero.cluster.spec import ClusterSpec

    _, _, unit = _unit()
    gpu = next(d for d in ClusterSpec.local().devices if d.kind == "gpu")
    backend = InductorBackend()
    options = CompileOptions(dtype="float16").with_extra(mode="max-autotune")
    backend.compile(unit, gpu, options, tmp_path)
    assert backend.start_warming(Artifact("inductor", "k", tmp_path, {}), gpu) is None


@pytest.mark.parametrize("warmed", [False, True])
def test_a_warmed_load_times_no_kernel_configs(tmp_path, monkeypatch, warmed):
    """Inductor times a kernel's configs on its first launch; after a warming that launched
    the program, the load reads the best ones from the cache. Unwarmed, the same load times
    some (the check that this one can fail)."""
    from torch._inductor.runtime.triton_heuristics import CachingAutotuner

    from hetero.backends.base import Artifact, CompileOptions
    from hetero.backends.inductor import InductorBackend
    from hetero.cluster.spec import ClusterSpec

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "cache" / "triton"))
    _, x, unit = _unit()
    gpu = next(d for d in ClusterSpec.local().devices if d.kind == "gpu")
    backend = InductorBackend()
    backend.compile(unit, gpu, CompileOptions(dtype="float16"), tmp_path / "a")
    artifact = Artifact("inductor", "k", tmp_path / "a", {})
    ready = None
    if warmed:
        warming = backend.start_warming(artifact, gpu)
        assert warming is not None and warming.wait(timeout_s=300)
        ready = warming.wait
    timed = []
    real = CachingAutotuner.benchmark_all_configs

    def counted(self, *args, **kwargs):
        timed.append(self.fn.__name__)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(CachingAutotuner, "benchmark_all_configs", counted)
    torch._dynamo.reset()
    backend.load_warmed(artifact, gpu, ready)(x)
    assert (not timed) if warmed else timed
