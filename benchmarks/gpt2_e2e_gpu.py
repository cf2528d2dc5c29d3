"""GPT-2 small and medium, float16, through `hetero.compile` on the H100 box's cluster.

    python benchmarks/gpt2_e2e_gpu.py --json out.json

The cluster is configs/clusters/h100-sxm-node.yaml (one H100 + its 16-core host): the
planner should put every op on the GPU (Triton backend), and the in-process executor runs
the plan. Eager and torch.compile (default, reduce-overhead) run in the same process on
the same inputs. Times are medians of CUDA-event-timed loops; error is ||out - eager|| /
||eager|| on last_hidden_state.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.gpt2_gpu import hidden, rel_err, timed

SIZES = {
    "small": dict(n_layer=12, n_embd=768, n_head=12),
    "medium": dict(n_layer=24, n_embd=1024, n_head=16),
}
CLUSTER = Path(__file__).resolve().parents[1] / "configs" / "clusters" / "h100-sxm-node.yaml"


def run_one(size: str, batch: int, seq: int, cache: Path) -> dict:
    from transformers import GPT2Config, GPT2Model

    import hetero

    torch.manual_seed(0)
    cfg = GPT2Config(use_cache=False, **SIZES[size])
    model = GPT2Model(cfg).to("cuda", torch.float16).eval()
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device="cuda")
    row = {"model": f"gpt2-{size}", "shape": f"{batch}x{seq}", "card": torch.cuda.get_device_name()}
    with torch.inference_mode():
        ref = hidden(model(ids))
        row["eager_ms"] = timed(model, (ids,))
        for mode in ("default", "reduce-overhead"):
            torch._dynamo.reset()
            fn = torch.compile(model, mode=None if mode == "default" else mode)
            # reduce-overhead hands out its CUDA graph's buffers: read them before the next call
            row[f"compile_{mode}_err"] = rel_err(hidden(fn(ids)).clone(), ref)
            row[f"compile_{mode}_ms"] = timed(fn, (ids,))
        torch._dynamo.reset()
        t0 = time.perf_counter()
        cm = hetero.compile(
            model, (ids,), cluster=CLUSTER, backends={"gpu": "triton", "cpu": "eager"},
            cache_dir=cache, executor="local",
        )  # fmt: skip
        row["hetero_compile_s"] = time.perf_counter() - t0
        plan = cm.plan
        row["devices"] = sorted({p.device for p in plan.partitions})
        row["partitions"] = len(plan.partitions)
        row["predicted_ms"] = plan.predicted_ms
        row["hetero_err"] = rel_err(hidden(cm(ids)).clone(), ref)
        row["hetero_ms"] = timed(cm, (ids,))
        row["explain"] = cm.plan.explain()
        cm.shutdown()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="small:8x512,small:1x64,medium:8x512")
    ap.add_argument("--json", default=None)
    ap.add_argument("--cache", default="/tmp/hetero-cache")
    args = ap.parse_args()
    rows = []
    for case in args.cases.split(","):
        size, shape = case.split(":")
        b, s = (int(x) for x in shape.split("x"))
        print(f"[{time.strftime('%H:%M:%S')}] {size} {shape}", flush=True)
        row = run_one(size, b, s, Path(args.cache))
        print(row.pop("explain"), flush=True)
        rows.append(row)
        print(json.dumps(row), flush=True)
    head = "| model | shape | eager | compile | reduce-overhead | hetero | predicted | err hetero | devices |"
    print(head + "\n|" + "---|" * 9)
    for r in rows:
        print(
            f"| {r['model']} | {r['shape']} | {r['eager_ms']:.3f} | {r['compile_default_ms']:.3f} | "
            f"{r['compile_reduce-overhead_ms']:.3f} | {r['hetero_ms']:.3f} | {r['predicted_ms']:.3f} | "
            f"{r['hetero_err']:.1e} | {', '.join(r['devices'])} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
