"""TVM-compiled CPU partitions vs torch eager, ONNX Runtime (CPU EP) and torch.compile.

Measured side by side in one process (interleaved rounds, median of per-round means):
  * the MLP block (Linear 256->1024, GELU, Linear, residual, LayerNorm on 8x128x256 fp32):
    TVM (matmuls to torch's BLAS, the rest fused by TVM), TVM with the Linear layers and
    their epilogues offloaded to oneDNN (CompileOptions onednn=True), eager, ONNX Runtime
    CPU EP, torch.compile;
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
from hetero.cluster.models import mlp_block, tiny_gpt
from hetero.cluster.spec import DeviceSpec
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--skip-gpt2", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results" / "tvm_cpu.json"))
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    cache = ArtifactCache(a.cache)
    device = DeviceSpec(name="local/cpu", kind="cpu", host="local", cores=a.threads)
    opts = CompileOptions()
    rows = []

    with torch.no_grad():
        # ---- MLP block ---------------------------------------------------------------------
        m, (x,) = mlp_block()
        tvm_run, err = tvm_chain(m, (x,), 1, cache, device, opts)
        onednn_run, onednn_err = tvm_chain(
            m, (x,), 1, cache, device, CompileOptions(extra=(("onednn", True),))
        )
        fns = {
            "eager": lambda: m(x),
            "tvm": tvm_run,
            "tvm+onednn": onednn_run,
            "onnxruntime": ort_session(m, x, a.threads),
        }
        compiled = torch.compile(m)
        compiled(x)
        fns["torch.compile"] = lambda: compiled(x)
        t = timeit(fns, a.rounds, 20)
        for k, v in t.items():
            e = {"tvm": err, "tvm+onednn": onednn_err}.get(k)
            rows.append({"model": "mlp_block 8x128x256", "engine": k, "ms": v,
                         "x_eager": v / t["eager"], "rel_err": e})  # fmt: skip

        # ---- demo model ----------------------------------------------------------------------
        m, args = tiny_gpt()
        tvm_run, err = tvm_chain(m, args, 2, cache, device, opts)
        t = timeit({"eager": lambda: m(*args), "tvm": tvm_run}, a.rounds, 10)
        for k, v in t.items():
            rows.append({"model": "demo tiny_gpt 2x64", "engine": k, "ms": v,
                         "x_eager": v / t["eager"], "rel_err": err if k == "tvm" else None})  # fmt: skip

        # ---- GPT-2 small ---------------------------------------------------------------------
        if not a.skip_gpt2:
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            m = GPT2LMHeadModel(GPT2Config(use_cache=False)).eval()
            ids = torch.randint(0, 50257, (1, 128))
            tvm_run, err = tvm_chain(m, (ids,), 2, cache, device, opts)
            t = timeit({"eager": lambda: m(ids), "tvm": tvm_run}, a.rounds, 3)
            for k, v in t.items():
                rows.append({"model": "gpt2-small 1x128", "engine": k, "ms": v,
                             "x_eager": v / t["eager"], "rel_err": err if k == "tvm" else None})  # fmt: skip

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
