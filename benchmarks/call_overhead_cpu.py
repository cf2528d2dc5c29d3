"""What hetero adds to each call of a compiled model, beyond the model's own work: a model
of one small op (`x * 2`, eager backend, in-process executor, one CPU partition) called
through `hetero.compile`'s result and directly, in alternating rounds.

Where it matters: a GPU partition whose graph replays in under a millisecond (MobileNetV3-L
at 0.88 ms on an H100) carries this on every call, on the host, ahead of its launch.

    python benchmarks/call_overhead_cpu.py [--calls 5000] [--rounds 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import hetero
from hetero.partitioner.decisions import BackendAssignment


class Double(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (x * 2,)


def per_call_us(fn, x: torch.Tensor, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn(x)
    return (time.perf_counter() - t) / calls * 1e6


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--calls", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, x = Double(), torch.randn(4, 4)
    cm = hetero.compile(
        model, (x,), cluster=hetero.Cluster.local(include_gpus=False), executor="local",
        choose="fixed", backends=BackendAssignment(by_kind=(("cpu", "eager"),)),
    )  # fmt: skip
    for _ in range(200):  # warm: first calls, caches
        cm(x)
        model(x)
    hetero_us, eager_us = [], []
    for _ in range(args.rounds):
        hetero_us.append(per_call_us(cm, x, args.calls))
        eager_us.append(per_call_us(model, x, args.calls))
    cm.shutdown()
    out = {
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__},
        "calls": args.calls,
        "rounds": args.rounds,
        "hetero_us": hetero_us,
        "eager_us": eager_us,
        "added_us_median": statistics.median(
            h - e for h, e in zip(hetero_us, eager_us, strict=True)
        ),
    }
    print(f"hetero {statistics.median(hetero_us):.1f} us a call, the model alone "
          f"{statistics.median(eager_us):.1f}: hetero adds {out['added_us_median']:.1f} us")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
