"""The measured backend choice on a GPU: every GPU backend (triton, inductor, cudagraphs,
inductor-cudagraphs) is compiled, checked and timed on the partition's real inputs, the fastest
runs (plain eager, a last resort on a GPU, is not measured once another passed its check), and
a second compile reads the choice from the cache; the cudagraphs backend alone matches eager.

Skipped where CUDA is absent. Run: pytest tests/gpu/test_choice_gpu.py
"""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def _model():
    from hetero.interfaces.models import mlp_block

    model, (x,) = mlp_block(batch=8, seq=128)
    return model.half().cuda(), (x.half().cuda(),)


def _gpu_only():
    """This machine without its CPU: one GPU partition."""
    from hetero.cluster.spec import ClusterSpec

    local = ClusterSpec.local()
    gpu = next(d.name for d in local.devices if d.kind == "gpu")
    return local.without([d.name for d in local.devices if d.name != gpu])


def test_the_fastest_gpu_backend_runs(tmp_path):
    import hetero

    model, x = _model()
    cluster = _gpu_only()
    kw = dict(cluster=cluster, cache_dir=tmp_path, executor="local", choose="measured")
    with hetero.compile(model, x, **kw) as cm:
        (p,) = cm.plan.partitions
        timed = {t.backend: t.ms for t in p.choice if t.ms is not None}
        assert {"triton", "inductor", "cudagraphs", "inductor-cudagraphs"} <= set(timed), p.choice
        assert p.backend == min(timed, key=timed.get)
        eager = next(t for t in p.choice if t.backend == "eager")
        assert eager.ms is None and eager.note.startswith("not measured: a last resort"), eager
        assert "chosen over" in cm.plan.explain()
        with torch.no_grad():
            got, want = cm(*x), model(*x)
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 2e-2
    with hetero.compile(model, x, **kw) as again:
        (q,) = again.plan.partitions
        assert q.choice_cached and q.backend == p.backend


def test_cudagraphs_matches_eager(tmp_path):
    import hetero

    model, x = _model()
    cluster = _gpu_only()
    with hetero.compile(
        model, x, cluster=cluster, backends={"gpu": "cudagraphs"}, cache_dir=tmp_path,
        executor="local",
    ) as cm:  # fmt: skip
        assert {s.backend for s in cm.stages} == {"cudagraphs"}
        with torch.no_grad():
            for _ in range(3):  # capture, then replays
                got, want = cm(*x), model(*x)
                torch.testing.assert_close(got, want, rtol=2e-3, atol=2e-3)
