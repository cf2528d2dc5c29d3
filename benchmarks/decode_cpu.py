"""A batch-1 decode layer on the CPU against the host's measured read bandwidth.

One LLaMA-7B-shaped decoder layer (hidden 4096, 32 heads of 128, SwiGLU 11008, RMSNorm)
taking one token against a KV cache of --cache-len positions (given as inputs; the new
key and value are appended, so attention reads the whole cache): 202 M weights, 810 MB in
fp32. At batch 1 every weight is read once per token and each matmul is a GEMV, so the
time is bound by how fast the CPU reads memory; the goal (issue 15) is >= 80% of the
measured read bandwidth.

Engines, each in its own process, alternated --repeats times (like tvm_cpu.py):
eager (torch's BLAS), tvm, inductor (hetero's backends, one partition), hetero (hetero.compile
on this CPU, the backend chosen by measurement). The bandwidth: the fastest full read of a
1 GiB buffer by any of three read-only kernels (an fp32 sum, a dot product, a matrix-vector
product; the same threads), measured in its own process in every alternation. Each cell:
ms per token (median of rounds), the achieved bandwidth (bytes the layer must read / time)
and that as a share of the measured read bandwidth.

    .venv/bin/python benchmarks/decode_cpu.py --threads 2 --repeats 5

Writes benchmarks/results/decode_cpu.json. Artifacts go to the artifact cache (--cache).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

from hetero.backends.base import CompileOptions
from hetero.backends.cache import ArtifactCache
from hetero.backends.registry import default_registry
from hetero.backends.units import contiguous_cut, units_for
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.api import compile as hetero_compile
from hetero.partitioner.graph import capture
from hetero.paths import cache_root

HERE = Path(__file__).resolve().parent
ENGINES = ("eager", "tvm", "inductor", "hetero")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class DecodeLayer(nn.Module):
    """A LLaMA decoder layer for one token at batch 1 against a KV cache (no rotary
    embedding: elementwise work next to 810 MB of weights)."""

    def __init__(self, dim: int = 4096, heads: int = 32, ffn: int = 11008) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_norm, self.mlp_norm = RMSNorm(dim), RMSNorm(dim)
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.o = nn.Linear(dim, dim, bias=False)
        self.gate = nn.Linear(dim, ffn, bias=False)
        self.up = nn.Linear(dim, ffn, bias=False)
        self.down = nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor):
        b, t, d = x.shape
        h = self.attn_norm(x)
        shape = (b, t, self.heads, self.head_dim)
        q = self.q(h).view(shape).transpose(1, 2)
        k = torch.cat([k_cache, self.k(h).view(shape).transpose(1, 2)], dim=2)
        v = torch.cat([v_cache, self.v(h).view(shape).transpose(1, 2)], dim=2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_dim)
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.o(attn)
        h = self.mlp_norm(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


def make(a) -> tuple[nn.Module, tuple[torch.Tensor, ...], int]:
    """(layer, inputs, bytes one token must read: weights + KV cache + the token)."""
    torch.manual_seed(0)
    dtype = getattr(torch, a.dtype)
    layer = DecodeLayer().eval().to(dtype)
    for p in layer.parameters():  # small weights: the residual stream stays finite
        nn.init.normal_(p, std=0.02) if p.dim() > 1 else nn.init.ones_(p)
    heads, hd = layer.heads, layer.head_dim
    x = torch.randn(1, 1, heads * hd, dtype=dtype)
    kc = torch.randn(1, heads, a.cache_len, hd, dtype=dtype)
    vc = torch.randn(1, heads, a.cache_len, hd, dtype=dtype)
    weights = sum(p.numel() * p.element_size() for p in layer.parameters())
    acts = sum(t.numel() * t.element_size() for t in (x, kc, vc))
    return layer, (x, kc, vc), weights + acts


def read_bandwidth(threads: int, gib: float = 1.0, reps: int = 15) -> dict[str, float]:
    """Bytes/s of the fastest full read of a `gib` GiB buffer by each of three kernels that
    only read it (an fp32 sum, a dot product of two halves, a matrix-vector product): the
    host's read bandwidth at these threads is the best of them (a sum alone stays under
    what a GEMV reaches here)."""
    torch.set_num_threads(threads)
    n = int(gib * 2**30 / 4)
    buf = torch.ones(n)
    half = n // 2
    mat = buf[: (n // 4096) * 4096].view(-1, 4096)
    vec = torch.ones(4096)
    kernels = {
        "sum": lambda: buf.sum(),
        "dot": lambda: torch.dot(buf[:half], buf[half : 2 * half]),
        "mv": lambda: torch.mv(mat, vec),
    }
    rates = {}
    for name, fn in kernels.items():
        fn()
        best = math.inf
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        rates[name] = n * 4 / best
    return rates


def one_backend(model, args, name: str, a):
    """The layer as one partition through hetero backend `name`; (callable, rel err)."""
    graph = capture(model, args)
    _, (unit,), env = units_for(graph, contiguous_cut(graph, 1), *args)
    device = ClusterSpec.local(include_gpus=False).devices[0]
    backend = default_registry().get(name)
    art = ArtifactCache(a.cache).build(backend, unit, device, CompileOptions())
    run = backend.load(art, device)
    out = graph.outputs[0]
    got = run(*[env[i] for i in unit.inputs])[unit.outputs.index(out)]
    return (lambda: run(*args)), _err(got, env[out])


def _err(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


def run_cell(engine: str, a) -> dict:
    torch.set_num_threads(a.threads)
    if engine == "bandwidth":
        rates = read_bandwidth(a.threads)
        return {"bytes_per_s": max(rates.values()), "kernels": rates}
    model, args, nbytes = make(a)
    extra: dict = {}
    with torch.no_grad():
        want = model(*args)
        if engine == "eager":
            fn, err = (lambda: model(*args)), 0.0
        elif engine == "hetero":
            cluster = ClusterSpec.local(include_gpus=False)
            cluster = cluster.with_device(cluster.devices[0].name, cores=a.threads)
            t0 = time.perf_counter()
            cm = hetero_compile(model, args, cluster=cluster, cache_dir=a.cache,
                                executor="local", choose="measured")  # fmt: skip
            extra["compile_s"] = time.perf_counter() - t0
            extra["choice"] = [
                {"partition": p.index, "backend": p.backend,
                 "times_ms": {t.backend: t.ms for t in p.choice}}
                for p in cm.plan.partitions
            ]  # fmt: skip
            fn, err = (lambda: cm(*args)), _err(cm(*args), want)
        else:
            fn, err = one_backend(model, args, engine, a)
        for _ in range(2):
            fn()
        rounds = []
        for _ in range(a.rounds):
            t0 = time.perf_counter()
            for _ in range(a.calls):
                fn()
            rounds.append((time.perf_counter() - t0) / a.calls)
    return {"ms": statistics.median(rounds) * 1e3, "best_ms": min(rounds) * 1e3,
            "bytes": nbytes, "rel_err": err, **extra}  # fmt: skip


def _child(engine: str, a) -> dict:
    cmd = [sys.executable, __file__, "--cell", engine, "--threads", str(a.threads),
           "--rounds", str(a.rounds), "--calls", str(a.calls), "--cache", a.cache,
           "--dtype", a.dtype, "--cache-len", str(a.cache_len)]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5, help="alternations of the engines")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--calls", type=int, default=5, help="tokens per round")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--cache-len", type=int, default=128, help="KV cache positions")
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--out", default=str(HERE / "results" / "decode_cpu.json"))
    ap.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # child mode
    a = ap.parse_args()
    a.cache = str(cache_root(a.cache))
    if a.cell:
        print(json.dumps(run_cell(a.cell, a)))
        return

    engines = a.engines.split(",")
    samples: dict[str, list[dict]] = {e: [] for e in ["bandwidth", *engines]}
    for _ in range(a.repeats):
        for engine in ["bandwidth", *engines]:
            samples[engine].append(_child(engine, a))
    bw = statistics.median(s["bytes_per_s"] for s in samples["bandwidth"])
    rows = []
    for engine in engines:
        ms = statistics.median(s["ms"] for s in samples[engine])
        nbytes = samples[engine][0]["bytes"]
        achieved = nbytes / (ms / 1e3)
        last = samples[engine][-1]
        rows.append({"engine": engine, "ms": ms, "GB_per_s": achieved / 1e9,
                     "share_of_read_bw": achieved / bw, "rel_err": last["rel_err"],
                     "samples_ms": [s["ms"] for s in samples[engine]],
                     "compile_s": [s["compile_s"] for s in samples[engine] if "compile_s" in s],
                     "choice": last.get("choice")})  # fmt: skip
    shown = ", ".join(f"{s['bytes_per_s'] / 1e9:.2f}" for s in samples["bandwidth"])
    print(f"\nread bandwidth {bw / 1e9:.2f} GB/s ({a.threads} threads; samples {shown})")
    print(f"{'engine':<10} {'ms/token':>9} {'GB/s':>7} {'of bw':>6} {'rel err':>8}  choice")
    for r in rows:
        chosen = ", ".join(c["backend"] for c in r["choice"] or ())
        print(f"{r['engine']:<10} {r['ms']:>9.2f} {r['GB_per_s']:>7.2f} "
              f"{r['share_of_read_bw']:>6.0%} {r['rel_err']:>8.1e}  {chosen}")  # fmt: skip
    meta = {
        "command": " ".join(["benchmarks/decode_cpu.py", *sys.argv[1:]]),
        "threads": a.threads, "dtype": a.dtype, "cache_len": a.cache_len,
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "load_avg": os.getloadavg(),
        "read_bytes_per_s": bw,
        "read_samples": [s["bytes_per_s"] for s in samples["bandwidth"]],
        "read_kernels": [s["kernels"] for s in samples["bandwidth"]],
        "env": {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "TVM_BIND_THREADS")},
    }  # fmt: skip
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
