"""hetero on CPUs (measured backend choice) and TVM-compiled partitions vs torch eager,
ONNX Runtime (CPU EP) and torch.compile.

Measured side by side in one run: every (model, engine) in its own process, a model's engines
alternated --repeats times (in one process the engines' thread pools disturb each other);
each cell is the median of per-round means, the table the median over repeats:
  * the MLP block (Linear 256->1024, GELU, Linear, residual, LayerNorm on 8x128x256 fp32):
    hetero (hetero.compile on this machine's CPU, each partition's backend chosen by
    measurement among TVM, inductor and eager), TVM alone (the large Linear layers with
    their epilogues to oneDNN, the rest fused by TVM), TVM with every matmul on torch's
    BLAS instead (CompileOptions onednn=False), eager, ONNX Runtime CPU EP, torch.compile;
  * the demo model (interfaces/models.py tiny_gpt): hetero, TVM cut into 2 partitions
    (chained), eager, ONNX Runtime, torch.compile;
  * GPT-2 small (124M, random weights, batch 1 x 128 tokens): hetero, TVM cut into 2
    partitions, eager.

    .venv/bin/python benchmarks/tvm_cpu.py --threads 2 --repeats 5

The hetero row's first alternation compiles and measures (its compile time, with the
choice, is in the JSON's `compile_s`); later ones read the choice from the cache.

Writes benchmarks/results/tvm_cpu.json and prints a table. Artifacts are cached in the
artifact cache (--cache, default the user cache dir): a second run skips compilation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
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
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.environment import THREAD_VARIABLES
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.models import mlp_block, tiny_gpt
from hetero.partitioner.graph import capture
from hetero.paths import cache_root

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


def ort_session(model, args, threads):
    import onnxruntime as ort

    path = Path(tempfile.mkdtemp()) / "model.onnx"
    names = [f"x{i}" for i in range(len(args))]
    torch.onnx.export(model, tuple(args), str(path), dynamo=False, input_names=names,
                      opset_version=17)  # fmt: skip
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {n: a.numpy() for n, a in zip(names, args, strict=True)}
    return lambda: sess.run(None, feed)


def hetero_engine(model, args, a):
    """hetero.compile on this machine's CPU with the measured backend choice: (callable,
    max rel err vs eager, compile seconds, what each partition chose)."""
    cluster = ClusterSpec.local(include_gpus=False)
    cluster = cluster.with_device(cluster.devices[0].name, cores=a.threads)
    t0 = time.perf_counter()
    cm = hetero_compile(model, args, cluster=cluster, cache_dir=a.cache, executor="local",
                        choose="measured")  # fmt: skip
    compile_s = time.perf_counter() - t0
    want = model(*args)
    got = cm(*args)
    err = float((got.double() - want.double()).norm() / want.double().norm())
    chosen = [
        {"partition": p.index, "backend": p.backend, "cached": p.choice_cached,
         "times_ms": {t.backend: t.ms for t in p.choice}, "predicted_ms": p.predicted_ms}
        for p in cm.plan.partitions
    ]  # fmt: skip
    return (lambda: cm(*args)), err, compile_s, chosen


# (model, engines, calls per round, partitions the TVM engine cuts the model into)
CASES = {
    "mlp_block 8x128x256": (
        ("eager", "hetero", "tvm", "tvm, blas only", "onnxruntime", "torch.compile"),
        20,
        1,
    ),
    "demo tiny_gpt 2x64": (("eager", "hetero", "tvm", "onnxruntime", "torch.compile"), 10, 2),
    "gpt2-small 1x128": (("eager", "hetero", "tvm"), 3, 2),
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
    err, extra = None, {}
    with torch.no_grad():
        if engine == "eager":
            fn = lambda: m(*args)  # noqa: E731
        elif engine == "hetero":
            fn, err, compile_s, chosen = hetero_engine(m, args, a)
            extra = {"compile_s": compile_s, "choice": chosen}
        elif engine == "onnxruntime":
            fn = ort_session(m, args, a.threads)
        elif engine == "torch.compile":
            compiled = torch.compile(m)
            fn = lambda: compiled(*args)  # noqa: E731
        else:
            device = DeviceSpec(name="local/cpu", kind="cpu", host="local", cores=a.threads)
            blas = (("onednn", False),) if engine == "tvm, blas only" else ()
            fn, err = tvm_chain(
                m, args, pieces, ArtifactCache(a.cache), device, CompileOptions(extra=blas)
            )
        return {"ms": timeit({engine: fn}, a.rounds, calls)[engine], "rel_err": err, **extra}


def _child(model: str, engine: str, a) -> dict:
    cmd = [sys.executable, __file__, "--cell", model, engine, "--threads", str(a.threads),
           "--rounds", str(a.rounds), "--cache", a.cache]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--only", default="", help="models whose name starts with this (e.g. mlp)")
    ap.add_argument("--out", default=str(HERE / "results" / "tvm_cpu.json"))
    ap.add_argument("--repeats", type=int, default=3, help="alternations of each model's engines")
    ap.add_argument("--cell", nargs=2, default=None, help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    a.cache = str(cache_root(a.cache))
    if a.cell:
        print(json.dumps(run_cell(*a.cell, a)))
        return

    # Each (model, engine) in its own process, a model's engines alternated --repeats
    # times: in one process the engines' thread pools disturb each other (TVM's workers
    # spin-wait after a run and took cores from whichever engine ran next: ONNX Runtime
    # measured 1.94x eager interleaved in one process, about 0.9x alone).
    rows = []
    for model, (engines, _, _) in CASES.items():
        if (a.skip_gpt2 and model.startswith("gpt2")) or not model.startswith(a.only):
            continue
        samples: dict[str, list[float]] = {e: [] for e in engines}
        errs: dict[str, float] = {}
        extra: dict[str, dict] = {e: {} for e in engines}
        for _ in range(a.repeats):
            for engine in engines:
                r = _child(model, engine, a)
                samples[engine].append(r["ms"])
                if r.get("rel_err") is not None:
                    errs[engine] = r["rel_err"]
                if "compile_s" in r:
                    extra[engine].setdefault("compile_s", []).append(r["compile_s"])
                    extra[engine]["choice"] = r["choice"]
        t = {e: statistics.median(v) for e, v in samples.items()}
        for k, v in t.items():
            rows.append({"model": model, "engine": k, "ms": v, "x_eager": v / t["eager"],
                         "rel_err": errs.get(k), "samples": samples[k], **extra[k]})  # fmt: skip

    print(f"\n{'model':<22} {'engine':<14} {'ms':>9} {'x eager':>8} {'rel err':>9}  choice")
    for r in rows:
        e = f"{r['rel_err']:.1e}" if r["rel_err"] is not None else ""
        chosen = ", ".join(f"p{c['partition']} {c['backend']}" for c in r.get("choice", ()))
        print(f"{r['model']:<22} {r['engine']:<14} {r['ms']:>9.2f} {r['x_eager']:>8.2f} {e:>9}"
              f"  {chosen}")  # fmt: skip
    meta = {
        "threads": a.threads,
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "env": {k: os.environ.get(k, "") for k in THREAD_VARIABLES},
        "load_avg": os.getloadavg(),
        "command": " ".join(["benchmarks/tvm_cpu.py", *sys.argv[1:]]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
