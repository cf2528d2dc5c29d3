"""Milliseconds per call of the MLP block and the demo model with the TVM backend pinned:
whether a change to how TVM's artifacts are built or loaded made the calls slower. Compare
two commits by running it with each on PYTHONPATH, alternating, in fresh processes:

    .venv/bin/python benchmarks/tvm_call_cpu.py --label after
    PYTHONPATH=/tmp/shim_old .venv/bin/python benchmarks/tvm_call_cpu.py --label before

One line per run: the median of `--rounds` rounds of `--calls` calls, each model compiled
into a fresh cache (2 threads). `--dtype float16` compiles the models in float16 (TVM's
16-bit weights reach torch's product rows first since dee5555: the MLP block took 513.0 ms
a call before it, 29.6-33.7 after, `--models mlp --rounds 5`, dev box).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

import hetero
from hetero.interfaces.models import mlp_block, tiny_gpt
from hetero.partitioner.decisions import BackendAssignment


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--label", default="")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--calls", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", help="the models' dtype (float16, bfloat16)")
    ap.add_argument("--models", nargs="+", default=["mlp", "demo"], choices=["mlp", "demo"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pinned = BackendAssignment((("cpu", "tvm"),), pinned=("cpu",))
    out = {}
    dtype = getattr(torch, args.dtype)
    models = {"mlp": mlp_block, "demo": lambda: tiny_gpt(batch=2, seq=64)}
    for name in args.models:
        model, x = models[name]()
        model = model.to(dtype)
        x = tuple(t.to(dtype) if t.is_floating_point() else t for t in x)
        with torch.no_grad():
            cm = hetero.compile(
                model, x, cache_dir=tempfile.mkdtemp(), executor="local", choose="fixed",
                backends=pinned,
            )  # fmt: skip
            assert all(s.backend == "tvm" for s in cm.stages)
            for _ in range(args.calls):
                cm(*x)
            rounds = []
            for _ in range(args.rounds):
                t = time.perf_counter()
                for _ in range(args.calls):
                    cm(*x)
                rounds.append((time.perf_counter() - t) / args.calls * 1e3)
        out[name] = round(statistics.median(rounds), 3)
        cm.shutdown()
    print(json.dumps({"label": args.label, "dtype": args.dtype, "ms": out}))


if __name__ == "__main__":
    main()
