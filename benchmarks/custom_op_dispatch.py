"""What calling hetero's split ops costs beyond their arithmetic: the dispatch of one tiny
call (a [1, 8] activation, [4, 8] weights, both shares on the CPU), for

  bare          the kernel as a Python function (the floor)
  custom_op     the same kernel registered with torch.library.custom_op (how gpu_cpu_mm
                was registered before), called as a graph calls it (its OpOverload)
  hetero        hetero::gpu_cpu_mm / hetero::gpu_cpu_mlp as registered now
                (torch.library.Library, one kernel per dispatch key)

With `--device cuda` the activation and the GPU's share are on the GPU: a real hand-off
(copy, wait, result kernel), so the columns differ by the dispatch alone.

Each is the best of `--rounds` rounds of `--calls` calls (the three interleaved), under
no_grad (as generation runs) and with grad enabled. One thread: the products are not what
is measured.

    python benchmarks/custom_op_dispatch.py [--calls 2000] [--rounds 30] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from collections.abc import Callable

import torch

from hetero.backends import gpu_cpu_mm as ops


def _custom_op_twins() -> dict[str, Callable]:
    """The kernels behind torch.library.custom_op, in a namespace of their own."""

    @torch.library.custom_op("hetero_bench::mm", mutates_args=())
    def mm(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
        return ops._gpu_cpu_mm(x, w_gpu, w_cpu)

    @torch.library.custom_op("hetero_bench::mlp", mutates_args=())
    def mlp(
        x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor, act: str, gated: bool
    ) -> torch.Tensor:
        return ops._gpu_cpu_mlp(x, w_gpu, w_cpu, act, gated)

    return {"mm": mm._opoverload, "mlp": mlp._opoverload}


def _per_call_us(fns: dict[str, Callable], args: tuple, calls: int, rounds: int) -> dict:
    """{name: the best round's us per call}; the rounds interleave the functions, so a
    neighbour's load on this shared machine slows them alike rather than one of them."""
    for fn in fns.values():
        for _ in range(min(calls, 1000)):
            fn(*args)
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls):
                fn(*args)
            best[name] = min(best[name], (time.perf_counter() - t0) / calls)
    return {name: round(t * 1e6, 2) for name, t in best.items()}


def measure(calls: int, rounds: int, device: str = "cpu") -> dict[str, dict[str, float]]:
    torch.set_num_threads(1)
    x = torch.randn(1, 8, device=device)
    w = torch.randn(4, 8)
    w_mlp = torch.randn(6, 8)  # gated, 2 features a side
    w_dev, w_mlp_dev = w.to(device), w_mlp.to(device)
    twins = _custom_op_twins()
    cases = {
        "mm": ((x, w_dev, w), ops._gpu_cpu_mm, twins["mm"], ops.gpu_cpu_mm),
        "mlp": (
            (x, w_mlp_dev, w_mlp, "silu", True),
            ops._gpu_cpu_mlp,
            twins["mlp"],
            ops.gpu_cpu_mlp,
        ),
    }
    out: dict[str, dict[str, float]] = {}
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            for op, (args, bare, twin, mine) in cases.items():
                key = f"{op}{'' if not grad else ' (grad enabled)'}"
                fns = {"bare": bare, "custom_op": twin, "hetero": mine}
                out[key] = _per_call_us(fns, args, calls, rounds)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--calls", type=int, default=2000, help="calls per round")
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--device", default="cpu", help="cuda: x and the GPU share there (the real hand-off)"
    )
    args = ap.parse_args()
    rows = measure(args.calls, args.rounds, args.device)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, x on {args.device}"
    )
    print(f"{'op':22s} {'bare':>8s} {'custom_op':>10s} {'hetero':>8s}   us per call")
    for op, r in rows.items():
        print(f"{op:22s} {r['bare']:8.2f} {r['custom_op']:10.2f} {r['hetero']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "calls": args.calls,
                    "rounds": args.rounds,
                    "us": rows,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
