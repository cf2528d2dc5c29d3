"""The host's share of a split MLP block at batch 1 (`mlp_share`), its down block in each
layout: the GPU's ([features, hidden], read as h @ W) and the host's ([hidden, features] rows,
read as h @ W.T; runtime/split_linear.py, SharedMatmuls.cut, says why). GB/s of weights read.

    .venv/bin/python benchmarks/cpu_mlp_share.py --features 8576 --json out.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from hetero.backends.gpu_cpu_mm import mlp_share


def _rate(args: tuple, nbytes: int, seconds: float) -> float:
    mlp_share(*args)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        mlp_share(*args)
        n += 1
    return nbytes * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--features", type=int, default=8576, help="the host's share (7B: 78%%)")
    ap.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=0, help="0: torch's default")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    ap.add_argument("--json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.dtypes:
        dtype = getattr(torch, name)
        g = torch.Generator().manual_seed(0)
        w = (torch.randn(3 * args.features, args.hidden, generator=g) / 64).to(dtype)
        x = torch.randn(1, args.hidden, generator=g).to(dtype)
        y = torch.empty(1, args.hidden, dtype=dtype)
        nbytes = w.numel() * w.element_size()
        row = {"dtype": name, "threads": torch.get_num_threads(), "mb": nbytes / 1e6}
        for label, host in (("gpu_layout_gbps", False), ("host_layout_gbps", True)):
            row[label] = _rate((x, w, "silu", True, y, host), nbytes, args.seconds)
        rows.append(row)
        print(
            f"{name:9s} {row['mb']:.0f} MB: h @ W {row['gpu_layout_gbps']:.1f} GB/s, "
            f"h @ W.T {row['host_layout_gbps']:.1f} GB/s",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
