"""Why a model's hetero row runs slower than its measured choice said (run 48: Mixtral's
chosen inductor-cudagraphs timed 5.0 ms in the choice, the row 8.5): one suite model compiled
with the measured choice and with each GPU backend pinned, each timed as the suite times a
row, with Dynamo's counters and a profile of a few calls (the top kernels and host ops, and
whether a CUDA graph was launched).

    python3 benchmarks/choice_vs_row_gpu.py --model mixtral --json $OUT/choice_vs_row.json
    python3 benchmarks/choice_vs_row_gpu.py --model mixtral --tiny     # on a CPU: the path only
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import backend_suite_gpu as suite


def profile(fn, inputs, calls: int = 3) -> dict:
    """The top ops of `calls` calls by device time and by host time, and how many CUDA graph
    launches they made."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with torch.no_grad(), torch_profile(activities=acts) as prof:
        for _ in range(calls):
            fn(*inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
    events = prof.key_averages()
    graph_launches = sum(e.count for e in events if "cudaGraphLaunch" in e.key)
    dev = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    top_dev = sorted(events, key=lambda e: getattr(e, dev, 0), reverse=True)[:12]
    top_host = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
    return {
        "cuda_graph_launches": graph_launches,
        "aten_calls": sum(e.count for e in events if e.key.startswith("aten::")),
        "top_device_us": [(e.key[:80], e.count, round(getattr(e, dev, 0) / calls, 1)) for e in top_dev],
        "top_host_us": [(e.key[:80], e.count, round(e.self_cpu_time_total / calls, 1)) for e in top_host],
    }  # fmt: skip


def one_way(env, model, inputs, backend: str | None) -> dict:
    """hetero.compile of the model, the GPU's backend measured (None) or pinned."""
    import hetero
    from hetero.partitioner.decisions import BackendAssignment
    from hetero.partitioner.split import flatten_inputs

    counters = torch._dynamo.utils.counters
    counters.clear()
    cache = tempfile.mkdtemp(prefix="hetero-cvr-")
    kinds = (("cpu", "eager"), ("gpu", backend or "triton"), ("npu", "eager"))
    t = time.perf_counter()
    cm = hetero.compile(
        model, inputs, cluster=suite.cluster(env), backends=BackendAssignment(by_kind=kinds),
        cache_dir=cache, executor="local", registry=suite.registry_without_tvm(),
        choose="fixed" if backend else None,
    )  # fmt: skip
    out: dict = {"backend": backend or "measured", "compile_s": time.perf_counter() - t}
    try:
        out["chosen"] = [
            (p.backend, [(c.backend, c.ms) for c in p.choice]) for p in cm.plan.partitions
        ]
        with torch.no_grad():
            cm(*inputs)
        out["ms"] = env.time_ms(cm, inputs)
        out["ms_again"] = env.time_ms(cm, inputs)
        # the call taken apart: the executor without the input check, and (one stage) the
        # backend's runner alone, as the choice timed it
        flat = flatten_inputs(cm.graph, inputs, {})
        out["executor_ms"] = env.time_ms(lambda *_: cm.executor.run(flat), inputs)
        if len(cm.stages) == 1:
            runner = cm.executor.runner(cm.stages[0].index)
            acts = [flat[n] for n in cm.stages[0].inputs]
            out["runner_ms"] = env.time_ms(lambda *_: runner(*acts), inputs)
        out["dynamo"] = {k: dict(v) for k, v in counters.items() if k in ("stats", "recompiles", "graph_break", "inductor")}  # fmt: skip
        out["profile"] = profile(cm, inputs)
    finally:
        cm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="mixtral", help=", ".join(suite.CASES))
    ap.add_argument("--ways", default="measured,inductor,inductor-cudagraphs",
                    help="measured and/or GPU backends to pin")  # fmt: skip
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--json")
    args = ap.parse_args()
    cuda = torch.cuda.is_available()
    env = suite.Env(
        device="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.float32,
        tiny=args.tiny, modes=(), budget_s=1e9, choice_budget_s=None, hetero=True,
        json_path=None, results={},
    )  # fmt: skip
    model, inputs = suite.CASES[args.model].build(env.tiny, env.device, env.dtype)
    rows = {"model": args.model, "card": torch.cuda.get_device_name() if cuda else "cpu"}
    with torch.no_grad():
        rows["eager_ms"] = env.time_ms(model, inputs)
    for way in args.ways.split(","):
        try:
            rows[way] = one_way(env, model, inputs, None if way == "measured" else way)
        except Exception as e:  # recorded; the other ways still run
            rows[way] = suite.failure(e)
        print(json.dumps({way: rows[way]}, default=str)[:3000], flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1, default=str))


if __name__ == "__main__":
    main()
