"""The Triton autotuner's parallel precompile: the same configs found as serial tuning,
the compile time and the counts reported in the manifest (hetero/compile_times.py)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_precompiled_tuning_finds_what_serial_tuning_finds(tmp_path, monkeypatch, caplog):
    import json
    import logging

    from triton_models import LinearEpilogue, assert_close, build

    import hetero.backends.triton.backend as triton_backend
    from hetero.backends.base import CompileOptions
    from hetero.backends.triton import TritonBackend, autotune

    model = LinearEpilogue("tanh", d=64, h=128).half().cuda()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    want = model(x)
    seen = {}

    def tune_with(threads):
        def tune(*args, **kwargs):
            assert kwargs["threads"] == threads  # TritonOptions.compile_threads reached it
            seen[threads] = autotune.tune(*args, **kwargs)
            return seen[threads]

        return tune

    caplog.set_level(logging.DEBUG, logger="hetero.triton.autotune")
    for threads in (1, 4):
        monkeypatch.setattr(triton_backend, "tune", tune_with(threads))
        where = tmp_path / f"threads{threads}"  # its own tuning cache: nothing known
        where.mkdir()
        opts = CompileOptions(tune_trials=4, extra=(("compile_threads", threads),))
        run, man = build(TritonBackend(), model, (x,), where, opts)
        assert_close(run(x)[0], want, torch.float16)
        assert man.build_counts["tuned"] >= 1 and man.build_counts["configs"] >= 1
        assert {"fuse", "codegen", "autotune", "weights"} <= set(man.build_seconds)
    assert set(seen[1].found) == set(seen[4].found) != set()
    assert seen[1].compile_s == 0.0 and seen[4].compile_s > 0.0
    assert seen[4].configs == seen[1].configs
    # `--log debug` shows every config timed, fastest first: [[ms, config], ...]
    logged = [json.loads(r.getMessage().split(": ", 1)[1]) for r in caplog.records
              if r.getMessage().startswith("tuned ")]  # fmt: skip
    assert logged and all(len(t) <= 4 for t in logged)
    assert all([ms for ms, _ in t] == sorted(ms for ms, _ in t) for t in logged)


def test_precompile_leaves_the_program_as_it_was(tmp_path):
    from triton_models import LinearEpilogue, build

    from hetero.backends.triton import TritonBackend, autotune
    from hetero.backends.triton.backend import _import

    model = LinearEpilogue("tanh", d=64, h=128).half().cuda()
    x = torch.randn(64, 64, dtype=torch.float16, device="cuda")
    build(TritonBackend(), model, (x,), tmp_path)
    art = tmp_path / "artifact"
    mod = _import(art / "program.py", "hetero_test_precompile")
    before = dict(vars(mod))
    kernels = [k for k in _kernels(art) if k.kind in autotune.CANDIDATES]
    weights = _weights(art)
    autotune.precompile(
        mod, kernels, lambda: mod.forward(x, *weights), 2, torch.device("cuda", 0), 4
    )
    assert {n: vars(mod)[n] for n in before} == before  # launchers and kernels restored


def _kernels(art):
    import json

    from hetero.backends.triton.codegen import Kernel

    config = json.loads((art / "triton.json").read_text())
    return [Kernel(**{**k, "space": tuple(k.get("space", ()))}) for k in config["kernels"]]


def _weights(art):
    import json

    from safetensors.torch import load_file

    config = json.loads((art / "triton.json").read_text())
    table = load_file(str(art / "weights.safetensors"), device="cuda")
    return [table[n] for n in config["weights"]]
