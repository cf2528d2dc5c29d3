"""Where hetero.compile's time goes on this machine's CPUs: GPT-2 small, torchvision
ConvNeXt-T and the tests' tiny LLaMA (generation), each compiled into a fresh cache, with
`CompileTimes` printed (the note explain() shows) and written as JSON.

    python benchmarks/compile_times_cpu.py --json /tmp/ctimes.json
    python benchmarks/compile_times_cpu.py --models gpt2 --choose fixed
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

import hetero


def gpt2(batch: int, seq: int):
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(use_cache=False)).eval()
    return model, (torch.randint(0, 50257, (batch, seq)),)


def convnext(batch: int):
    from torchvision.models import convnext_tiny

    return convnext_tiny().eval(), (torch.randn(batch, 3, 224, 224),)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,convnext-t,tiny-llama")
    ap.add_argument("--choose", default="measured", help="measured or fixed (backend choice)")
    ap.add_argument("--twice", action="store_true", help="compile again into the same cache")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for name in args.models.split(","):
        cache = tempfile.mkdtemp(prefix="hetero-ctimes-")
        # built once: a second build draws other random weights, hence other artifact keys
        # (--twice then compiled another model and measured a miss, not the cache)
        if name != "tiny-llama":
            model, inputs = gpt2(1, 128) if name == "gpt2" else convnext(2)
        for attempt in range(2 if args.twice else 1):
            start = time.perf_counter()
            if name == "tiny-llama":
                sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
                from llm_models import llama_lm

                compiled = hetero.compile(
                    llama_lm(), task="generate", max_length=64, cache_dir=cache, executor="local"
                )
            else:
                with torch.no_grad():
                    compiled = hetero.compile(
                        model, inputs, cache_dir=cache, executor="local", choose=args.choose
                    )
            wall = time.perf_counter() - start
            times = compiled.compile_times
            compiled.shutdown()
            print(f"{name} (compile {attempt + 1}): {wall:.1f} s wall; {times.note()}", flush=True)
            rows.append({"model": name, "attempt": attempt + 1, "wall_s": wall,
                         "compile_times": times.to_dict()})  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
