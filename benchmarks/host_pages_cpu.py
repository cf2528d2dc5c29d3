"""Does a host CPU's decode read its weights faster from huge pages? The bytes per second of
hetero::gemv (and of torch.mm, and of a plain `t.sum()` read) over a 7B layer's matrices
kept in 4 KiB pages (torch's allocator) against a copy of them re-backed by transparent huge
pages in place (runtime/host_pages.py `collapse`, what generation does to the host CPU's
weights), in alternating rounds.

    python benchmarks/host_pages_cpu.py [--threads N] [--rounds 5] [--layers 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from hetero.backends import cpu_gemv
from hetero.runtime.host_pages import collapse, thp_mode

SHAPES = ((4096, 4096),) * 4 + ((11008, 4096),) * 2 + ((4096, 11008),)  # one LLaMA-7B layer


def _rate(weights: list[torch.Tensor], product, seconds: float) -> float:
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    best, end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        for w in weights:
            product(w)
        best = max(best, nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=2, help="layers' matrices read in turn")
    ap.add_argument("--seconds", type=float, default=0.5, help="per way per round")
    ap.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    small = [torch.randn(n, k, dtype=torch.float32).to(dtype) for n, k in SHAPES * args.layers]
    huge = [w.clone() for w in small]
    t0 = time.perf_counter()
    collapsed = collapse(huge)
    collapse_s = time.perf_counter() - t0
    x = torch.randn(1, 4096, dtype=torch.float32).to(dtype)
    x_wide = torch.randn(1, 11008, dtype=torch.float32).to(dtype)

    def vec(w: torch.Tensor) -> torch.Tensor:
        return x if w.shape[1] == x.shape[1] else x_wide

    ways = {"sum": lambda w: w.sum(), "torch.mm": lambda w: torch.mm(vec(w), w.t())}
    if cpu_gemv.available():
        ways["hetero gemv"] = lambda w: cpu_gemv.gemv(vec(w), w)
    for product in ways.values():  # builds, warms
        for w in (*small[:1], *huge[:1]):
            product(w)
    got: dict[str, dict[str, list[float]]] = {n: {"4k": [], "huge": []} for n in ways}
    for _ in range(args.rounds):
        for name, product in ways.items():
            for pages, weights in (("4k", small), ("huge", huge)):
                got[name][pages].append(_rate(weights, product, args.seconds))
    out = {
        "machine": {
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "thp": thp_mode(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
        "collapsed_bytes": collapsed,
        "collapse_s": round(collapse_s, 3),
        "weight_bytes": sum(w.numel() * w.element_size() for w in small),
        "GBps": {
            n: {p: round(statistics.median(v), 2) for p, v in by.items()} for n, by in got.items()
        },
        "rounds": got,
    }
    print(f"{collapsed / 1e9:.2f} of {out['weight_bytes'] / 1e9:.2f} GB collapsed into huge "
          f"pages in {collapse_s:.2f} s")  # fmt: skip
    print(f"THP {out['machine']['thp']!r}, {args.threads} threads, {args.dtype}, "
          f"{args.layers} layers' matrices; median GB/s over {args.rounds} alternations")  # fmt: skip
    for name, by in out["GBps"].items():
        ratio = by["huge"] / by["4k"] if by["4k"] else float("nan")
        print(f"  {name:12s} 4k {by['4k']:7.2f}  huge {by['huge']:7.2f}  ({ratio:.3f}x)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
