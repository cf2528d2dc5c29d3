"""How many torch.export calls the backends make while `hetero.compile` measures the backend
choice, and their seconds (issue 15: each candidate exported the partition again).

One model per process (a fresh artifact cache; Inductor's own cache as it is), on this
machine's `Cluster.local()` (its GPUs too, where there are any):

    python benchmarks/choice_exports.py gpt2        # GPT-2, 2 layers of 256
    python benchmarks/choice_exports.py convnext    # ConvNeXt, depths 1-1-2-1

Prints one JSON row: compile wall seconds, export calls and seconds by caller
(`export_unit`, `export_streamed`; `other`: the capture's own), the main output's relative
error against eager, the chosen backends, then explain()'s compile-time note.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
import time
import traceback

import torch

import hetero

CALLERS = ("export_unit", "export_streamed")


def gpt2():
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(n_layer=2, n_embd=256, n_head=4, vocab_size=2048, use_cache=False)
    return GPT2Model(cfg).eval(), (torch.randint(0, 2048, (1, 64)),)


def convnext():
    from transformers import ConvNextConfig, ConvNextModel

    cfg = ConvNextConfig(depths=[1, 1, 2, 1], hidden_sizes=[32, 64, 128, 256])
    return ConvNextModel(cfg).eval(), (torch.randn(1, 3, 96, 96),)


MODELS = {"gpt2": gpt2, "convnext": convnext}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", choices=sorted(MODELS))
    args = ap.parse_args()
    calls: collections.Counter[str] = collections.Counter()
    seconds: collections.Counter[str] = collections.Counter()
    real = torch.export.export

    def counting(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            stack = traceback.extract_stack()[:-1]
            who = next((f.name for f in reversed(stack) if f.name in CALLERS), "other")
            calls[who] += 1
            seconds[who] += time.perf_counter() - t0

    torch.export.export = counting  # backends/export.py and eager.py look it up here
    torch.manual_seed(0)
    model, inputs = MODELS[args.model]()
    cache = tempfile.mkdtemp(prefix="hetero-exports-")
    start = time.perf_counter()
    with torch.no_grad():
        cm = hetero.compile(model, inputs, cache_dir=cache, executor="local", choose="measured")
    wall = time.perf_counter() - start
    with torch.no_grad():
        want, got = model(*inputs).last_hidden_state, cm(*inputs)
    got = got[0] if isinstance(got, tuple | list) else got.last_hidden_state
    row = {
        "model": args.model,
        "wall_s": round(wall, 2),
        "exports": dict(calls),
        "export_s": {k: round(v, 2) for k, v in seconds.items()},
        "error": float((got.cpu() - want).norm() / want.norm()),
        "backends": [p.backend for p in cm.plan.partitions],
    }
    print(json.dumps(row))
    print(cm.compile_times.note())
    cm.shutdown()


if __name__ == "__main__":
    main()
