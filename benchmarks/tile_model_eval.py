"""How much kernel speed keeping only tile_model's top K matmul configs would lose, from the
`tuned <kernel> <kind> space=(b, m, n) flops=<2bmnk>: [[ms, config], ...]` lines that
`backend_suite_gpu.py --log debug` writes (every config's time per tuned kernel).

For each K: the best time among the model's top K against the best of all, per kernel (max
and mean ratio) and summed over the kernels.

    python benchmarks/tile_model_eval.py benchmarks/results/backend_suite_run51_{gpt2,mixtral}.log
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path

from hetero.backends.triton.tile_model import Gemm, Gpu, ranked

LINE = re.compile(r"tuned (\S+) (\S+) space=\(([\d, ]+)\) flops=(\d+): (\[.*\])\s*$")
# H100 and H200 SXM: 132 SMs, 228 KiB of shared memory and 2,048 threads per SM
HOPPER = Gpu(sms=132, shared_bytes=228 << 10, threads=2048)


def kernels(paths: list[str]) -> list[tuple[str, Gemm, list]]:
    out = []
    for path in paths:
        for line in Path(path).read_text().splitlines():
            m = LINE.search(line)
            if not m:
                continue
            name, kind, space, flops, measured = m.groups()
            dims = [int(x) for x in space.split(",")]
            if kind not in ("matmul", "gated") or len(dims) != 3:
                continue
            gemm = Gemm.of_kernel(kind, tuple(dims), int(flops))
            out.append((f"{path}:{name}", gemm, json.loads(measured)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("logs", nargs="+")
    args = ap.parse_args()
    found = kernels(args.logs)
    print(f"{len(found)} tuned matmul kernels")
    for keep in range(1, 15):
        ratios, kept, best = [], 0.0, 0.0
        for _, gemm, measured in found:
            top = ranked(tuple(c for _, c in measured), gemm, HOPPER)[:keep]
            fastest = min(ms for ms, _ in measured)
            chosen = min((ms for ms, c in measured if c in top), default=math.inf)
            ratios.append(chosen / fastest)
            kept, best = kept + chosen, best + fastest
        print(f"top {keep:2d}: worst kernel {max(ratios):.3f}x, mean {sum(ratios) / len(ratios):.3f}x, "
              f"summed {100 * (kept / best - 1):+.2f}%")  # fmt: skip


if __name__ == "__main__":
    main()
