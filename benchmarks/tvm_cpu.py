"""TVM-compiled CPU partitions vs torch eager, ONNX Runtime (CPU EP) and torch.compile.

Measured side by side in one run: every (model, engine) in its own process, a model's engines
alternated --repeats times (in one process the engines' thread pools disturb each other);
each cell is the median of per-round means, the table the median over repeats:
  * the MLP block (Linear 256->1024, GELU, Linear, residual, LayerNorm on 8x128x256 fp32):
    TVM (the large Linear layers with their epilogues to oneDNN, the rest fused by TVM), TVM
    with every matmul on torch's BLAS instead (CompileOptions onednn=False), eager, ONNX
    Runtime CPU EP, torch.compile;
  * the demo model (cluster/models.py tiny_gpt) cut into 2 TVM partitions, chained;
  * GPT-2 small (124M, random weights, batch 1 x 128 tokens) cut into 2 TVM partitions.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_cpu.py --threads 2

Writes benchmarks/results/tvm_cpu.json and prints a table. Artifacts are cached in the
artifact cache (--cache, default the user cache dir): a second run skips compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hetero.backends.base import CompileOptions
from hetero.backends.cache import ArtifactCache
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.registry import default_registry
from hetero.backends.units import contiguous_cut, units_for
from hetero.cluster.spec import DeviceSpec
from hetero.interfaces.models import mlp_block, tiny_gpt
from hetero.partitioner.graph import capture

HERE = Path(__file__).resolve().parent


def timeit(fns: dict[str, Callable[[], object]], rounds: int, iters: int) -> dict[str, float]:
    """ms per call for each fn: interleaved rounds, median of the per-round means."""
    for f in fns.values():
        for _ in range(3):
            f()
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, f in fns.items():
            t0 = time.perf_counter()
            for _ in range(iters):
                f()
            samples[name].append((time.perf_counter() - t0) / iters * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def tvm_chain(model, args, pieces, cache, device, opts):
    """Compile `model` cut into `pieces` TVM partitions; return (run-all callable, max rel err)."""
    graph = capture(model, args)
    _, units, env = units_for(graph, contiguous_cut(graph, pieces), *args)
    arts = compile_units([CompileJob(u, device, "tvm", opts) for u in units], cache, workers=1)
    tvm = default_registry().get("tvm")
    runners = [tvm.load(a, device) for a in arts]
    user = {k: env[k] for k in graph.inputs}

    def run():
        vals = dict(user)
        for unit, r in zip(units, runners, strict=True):
            vals.update(zip(unit.outputs, r(*[vals[a] for a in unit.inputs]), strict=True))
        return vals[graph.outputs[0]]

    want = env[graph.outputs[0]]
    got = run()
    err = float((got.double() - want.double()).norm() / want.double().norm())
    return run, err


def ort_session(model, x, threads):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "mlp.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], opset_version=17)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {"x": x.numpy()}
    return lambda: sess.run(None, feed)


# (model, engines, calls per round, partitions the TVM engine cuts the model into)
CASES = {
    "mlp_block 8x128x256": (
        ("eager", "tvm", "tvm, blas only", "onnxruntime", "torch.compile"),
        20,
        1,
    ),
    "demo tiny_gpt 2x64": (("eager", "tvm"), 10, 2),
    "gpt2-small 1x128": (("eager", "tvm"), 3, 2),
}


def _model(name: str):
    if name.startswith("mlp_block"):
        m, (x,) = mlp_block()
        return m, (x,)
    if name.startswith("demo"):
        return tiny_gpt()
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(use_cache=False)).eval(), (torch.randint(0, 50257, (1, 128)),)


def run_cell(model: str, engine: str, a) -> dict:
    """Time one engine on one model in this process (the child of `_child`)."""
    torch.set_num_threads(a.threads)
    m, args = _model(model)
    _, calls, pieces = CASES[model]
    err = None
    with torch.no_grad():
        if engine == "eager":
            fn = lambda: m(*args)  # noqa: E731
        elif engine == "onnxruntime":
            fn = ort_session(m, args[0], a.threads)
        elif engine == "torch.compile":
            compiled = torch.compile(m)
            fn = lambda: compiled(*args)  # noqa: E731
        else:
            device = DeviceSpec(name="local/cpu", kind="cpu", host="local", cores=a.threads)
            extra = (("onednn", False),) if engine == "tvm, blas only" else ()
            fn, err = tvm_chain(
                m, args, pieces, ArtifactCache(a.cache), device, CompileOptions(extra=extra)
            )
        return {"ms": timeit({engine: fn}, a.rounds, calls)[engine], "rel_err": err}


def _child(model: str, engine: str, a) -> dict:
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--cell", model, engine, "--threads", str(a.threads),
           "--rounds", str(a.rounds)] + (["--cache", a.cache] if a.cache else [])  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "tvm_cpu.json"))
    ap.add_argument("--repeats", type=int, default=3, help="alternations of each model's engines")
    ap.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    if a.cell:
        print(json.dumps(run_cell(*a.cell, a)))
        return

    # Each (model, engine) in its own process, a model's engines alternated --repeats
    # times: in one process the engines' thread pools disturb each other (TVM's workers
    # spin-wait after a run and took cores from whichever engine ran next: ONNX Runtime
    # measured 1.94x eager interleaved in one process, about 0.9x alone).
    rows = []
    for model, (engines, _, _) in CASES.items():
        if a.skip_gpt2 and model.startswith("gpt2"):
            continue
        samples: dict[str, list[float]] = {e: [] for e in engines}
        errs: dict[str, float] = {}
        for _ in range(a.repeats):
            for engine in engines:
                r = _child(model, engine, a)
                samples[engine].append(r["ms"])
                if r.get("rel_err") is not None:
                    errs[engine] = r["rel_err"]
        t = {e: statistics.median(v) for e, v in samples.items()}
        for k, v in t.items():
            rows.append({"model": model, "engine": k, "ms": v, "x_eager": v / t["eager"],
                         "rel_err": errs.get(k), "samples": samples[k]})  # fmt: skip

    print(f"\n{'model':<22} {'engine':<14} {'ms':>9} {'x eager':>8} {'rel err':>9}")
    for r in rows:
        e = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        print(f"{r['model']:<22} {r['engine']:<14} {r['ms']:>9.2f} {r['x_eager']:>8.2f} {e:>9}")
    meta = {
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "env": {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "load_avg": os.getloadavg(),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
