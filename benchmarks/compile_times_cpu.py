"""Where hetero.compile's time goes on this machine's CPUs, against torch.compile's cold
compile of the same model: GPT-2 small, torchvision ConvNeXt-T, the tests' tiny LLaMA and
`llama-22`, the 1.1B's 22 layers narrowed (generation; hetero only), each compiled into a
fresh artifact cache, with `CompileTimes` printed (the note explain() shows) and written as
JSON.

Every compile runs in a fresh process with a fresh Inductor cache (TORCHINDUCTOR_CACHE_DIR),
so neither way finds kernels an earlier run compiled; the ways alternate `--repeats` times.

    python benchmarks/compile_times_cpu.py --models gpt2 --repeats 2 --json /tmp/ctimes.json
    python benchmarks/compile_times_cpu.py --models gpt2 --choose fixed --ways hetero
    python benchmarks/compile_times_cpu.py --models gpt2 --twice     # a second compile, same cache
    python benchmarks/compile_times_cpu.py --models llama-22 --ways hetero --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WAYS = ("hetero", "torch.compile")


def gpt2(batch: int, seq: int):
    import torch
    from transformers import GPT2Config, GPT2Model

    model = GPT2Model(GPT2Config(use_cache=False)).eval()
    return model, (torch.randint(0, 50257, (batch, seq)),)


def convnext(batch: int):
    import torch
    from torchvision.models import convnext_tiny

    return convnext_tiny().eval(), (torch.randn(batch, 3, 224, 224),)


def llama22():
    """The 1.1B LLaMA's 22 layers at a width this box compiles in a minute (hidden 256): a
    generation's programs of ~2,000 nodes each, as the 1.1B's, whose capture and writing
    dominate a generation's compile before its Inductor compiles (backend_suite.md)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=256, intermediate_size=704, num_hidden_layers=22,
                      num_attention_heads=8, num_key_value_heads=4, vocab_size=1024,
                      max_position_embeddings=512)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


# generation: hetero only (task="generate"); torch.compile has no such one-call path
GENERATION = ("tiny-llama", "llama-22")


def one(model_name: str, way: str, choose: str, twice: bool) -> list[dict]:
    """Compile `model_name` one `way` in this process (a child); its rows."""
    import torch

    import hetero

    torch.manual_seed(0)
    cache = tempfile.mkdtemp(prefix="hetero-ctimes-")
    rows = []
    # built once: a second build draws other random weights, hence other artifact keys
    if model_name not in GENERATION:
        model, inputs = gpt2(1, 128) if model_name == "gpt2" else convnext(2)
    for attempt in range(2 if twice else 1):
        start = time.perf_counter()
        if way == "torch.compile":
            compiled = torch.compile(model)
            with torch.no_grad():
                compiled(*inputs)  # Inductor compiles on the first call
            rows.append({"model": model_name, "way": way, "attempt": attempt + 1,
                         "wall_s": time.perf_counter() - start})  # fmt: skip
            continue
        if model_name == "tiny-llama":
            sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
            from llm_models import llama_lm

            compiled = hetero.compile(
                llama_lm(), task="generate", max_length=64, cache_dir=cache, executor="local"
            )
        elif model_name == "llama-22":
            compiled = hetero.compile(
                llama22(), task="generate", max_length=320, batch_size=4, cache_dir=cache,
                executor="local",
            )  # fmt: skip
        else:
            with torch.no_grad():
                compiled = hetero.compile(
                    model, inputs, cache_dir=cache, executor="local", choose=choose
                )
        wall = time.perf_counter() - start
        times = compiled.compile_times
        plan = compiled.plan
        plans = (plan.prefill, plan.decode) if hasattr(plan, "decode") else (plan,)
        chosen = sorted({p.backend for plan in plans for p in plan.partitions})
        compiled.shutdown()
        rows.append({"model": model_name, "way": way, "attempt": attempt + 1, "wall_s": wall,
                     "backends": chosen, "note": times.note(),
                     "compile_times": times.to_dict()})  # fmt: skip
    return rows


def in_fresh_process(cmd: list[str], what: str) -> Any:
    """Runs `cmd` in a fresh process with a fresh Inductor cache; the JSON it printed last
    after "ROWS " (None where it failed: printed with its error, as `what`)."""
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=tempfile.mkdtemp(prefix="ind-"))
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    found = [ln for ln in out.stdout.splitlines() if ln.startswith("ROWS ")]
    if out.returncode or not found:
        print(f"{what}: failed\n{out.stderr[-3000:]}", flush=True)
        return None
    return json.loads(found[-1][5:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,convnext-t,tiny-llama")
    ap.add_argument("--ways", default=",".join(WAYS), help="hetero and/or torch.compile")
    ap.add_argument("--choose", default="measured", help="measured or fixed (backend choice)")
    ap.add_argument("--twice", action="store_true", help="compile again into the same cache")
    ap.add_argument("--repeats", type=int, default=1, help="alternations of the ways")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "WAY"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        rows = one(args.child[0], args.child[1], args.choose, args.twice)
        print("ROWS " + json.dumps(rows), flush=True)
        return
    rows: list[dict] = []
    for name in args.models.split(","):
        ways = [w for w in args.ways.split(",") if name not in GENERATION or w == "hetero"]
        for _ in range(args.repeats):
            for way in ways:
                cmd = [sys.executable, __file__, "--child", name, way, "--choose", args.choose]
                got = in_fresh_process(cmd + (["--twice"] if args.twice else []), f"{name} {way}")
                for row in got or []:
                    rows.append(row)
                    extra = (
                        f"; {row['note']} (ran {', '.join(row['backends'])})"
                        if "note" in row
                        else ""
                    )
                    print(f"{name} {way} (compile {row['attempt']}): {row['wall_s']:.1f} s{extra}",
                          flush=True)  # fmt: skip
        first = [r for r in rows if r["model"] == name and r["attempt"] == 1]
        walls = {w: [r["wall_s"] for r in first if r["way"] == w] for w in ways}
        if all(walls.get(w) for w in WAYS):
            h, t = (statistics.median(walls[w]) for w in WAYS)
            print(f"{name}: hetero {h:.1f} s, torch.compile {t:.1f} s: {h / t:.2f}x (medians "
                  f"of {len(walls['hetero'])})", flush=True)  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
