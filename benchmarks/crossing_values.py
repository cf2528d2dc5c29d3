"""What a value crossing between two partitions costs in-process (issue 16's mid-block cut).

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/crossing_values.py [--sessions 8]
        [--json benchmarks/results/crossing_values.json] [--md benchmarks/results/crossing_values.md]

1. Per value and per byte: a partition `k` inputs -> `k` outputs (`x_i + 1`), compiled
   through TVM for the CPU and run the way the in-process executor runs a stage
   (`StageRunner`: the runner's argument conversion, its VM call, the outputs' host copy and
   the stage's records). Equal total bytes split over 1..8 values give the cost per value;
   one value of growing size the cost per byte.
2. The demo's two throughput plans that issue 16's sweep split: cut at block 2's boundary
   (one value crosses) and after its qkv projection (two values cross), measured in
   `--sessions` interleaved sessions as the sweep measures them (`cost_feedback.measure`):
   the spread of the slowest stage between sessions against the difference between plans.
"""

from __future__ import annotations

import os

# hetero's own processes run so (hetero/environment.py); OpenMP reads it when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from hetero.backends.base import CompileOptions
from hetero.backends.cache import ArtifactCache
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.registry import default_registry
from hetero.backends.units import units_for
from hetero.calibration.timing import time_call
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.graph import capture
from hetero.runtime.stage import StageSpec
from hetero.runtime.worker import StageRunner, caller_packet

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


class PlusOne(torch.nn.Module):
    def forward(self, *xs):
        return tuple(x + 1 for x in xs)


def stage_runner(k: int, numel: int, device, registry, cache) -> tuple[StageRunner, list]:
    """A StageRunner of `k` inputs of `numel` floats each, compiled through TVM."""
    xs = tuple(torch.randn(1, numel) for _ in range(k))
    graph = capture(PlusOne(), xs)
    _, cunits, env = units_for(graph, dict.fromkeys(graph.order, 0), *xs)
    cu = cunits[0]
    [art] = compile_units(
        [CompileJob(cu, device, "tvm", CompileOptions())], cache, progress=False, registry=registry
    )
    runner = registry.get("tvm").load(art, device)
    spec = StageSpec(0, device, "tvm", art, tuple(cu.inputs), tuple(cu.outputs))
    return StageRunner(spec, runner, device), [env[a] for a in cu.inputs]


def per_value(registry, cache) -> dict:
    device = ClusterSpec.from_yaml(ROOT / "configs/clusters/dev-box-npu.yaml").device("cpu")
    total = 8 * 4096  # floats: 128 KiB, the demo's qkv output is 96 KiB
    rows = []
    for k in (1, 2, 4, 8):
        sr, args = stage_runner(k, total // k, device, registry, cache)
        packet = [caller_packet(dict(zip(sr.stage.inputs, args, strict=True)))]
        with torch.no_grad():
            t_stage = time_call(lambda sr=sr, p=packet: sr(p, True), budget=1.0)
            t_runner = time_call(lambda sr=sr, a=args: sr.runner(*a), budget=1.0)
        rows.append({"values": k, "bytes": 4 * total, "stage_us": t_stage * 1e6,
                     "runner_us": t_runner * 1e6})  # fmt: skip
        print(rows[-1], flush=True)
    sizes = []
    for numel in (1024, 8192, 65536):
        sr, args = stage_runner(1, numel, device, registry, cache)
        packet = [caller_packet(dict(zip(sr.stage.inputs, args, strict=True)))]
        with torch.no_grad():
            t_stage = time_call(lambda sr=sr, p=packet: sr(p, True), budget=1.0)
        sizes.append({"values": 1, "bytes": 4 * numel, "stage_us": t_stage * 1e6})
        print(sizes[-1], flush=True)
    k = np.array([r["values"] for r in rows], float)
    b = np.array([r["bytes"] for r in sizes], float)
    return {
        "equal_bytes": rows,
        "one_value": sizes,
        # each value is one input and one output of the partition: the slope is per pair
        "us_per_value": float(np.polyfit(k, [r["stage_us"] for r in rows], 1)[0]),
        "us_per_value_runner": float(np.polyfit(k, [r["runner_us"] for r in rows], 1)[0]),
        "us_per_kib": float(np.polyfit(b / 1024, [r["stage_us"] for r in sizes], 1)[0]),
    }


def sessions(n: int) -> list[dict]:
    from cost_feedback import CPU_CASES, Bench

    from hetero.partitioner.algorithms.assemble import assemble
    from hetero.partitioner.algorithms.problem import Solution
    from hetero.partitioner.decisions import Objective

    bench = Bench(argparse.Namespace(recalibrate=False, quick=False, runs=30, warmup=5,
                                     quantile=0.25))  # fmt: skip
    spec, graph, x, cm, fb = bench.prepare(CPU_CASES[0])
    obj = Objective.parse("throughput")
    fb.objective = obj
    priced = fb.pricing(cm)
    pr = priced.problem
    place = {pr.devices[pl.device].split("/")[-1]: i for i, pl in enumerate(pr.placements)}
    cuts = {name: pr.names.index(name) for name in ("blocks.2.ln1", "blocks.2.attn")}
    deps, predicted = [], {}
    for name, k in cuts.items():
        assign = np.array([place["cpu"]] * k + [place["npu"]] * (pr.n - k))
        plan = assemble(pr, priced.context, Solution(assign, pr.throughput(assign), "x"),
                        objective=obj)  # fmt: skip
        deps.append((bench.compile(graph, plan, spec, x), plan))
        predicted[name] = [t * 1e3 for t in pr.stage_times(assign)]
    out = []
    for _ in range(n):
        load = os.getloadavg()[0]
        runs = bench.run(deps, graph, x)
        row = {"load": load}
        for name, r in zip(cuts, runs, strict=True):
            row[name] = [m.stage_ms for m in r.measured.values()]
        a, b = (max(row[name]) for name in cuts)
        row["gap"] = b / a - 1
        out.append(row)
        print(row, flush=True)
    return [{"predicted_stages_ms": predicted}, *out]


def markdown(result: dict) -> str:
    pv, m = result["per_value"], result["meta"]
    lines = [
        "# What a value crossing between partitions costs in-process (issue 16)",
        "",
        f"    {m['command']}",
        "",
        f"Run {m['date']} on the shared 2-core development box ({m['cpus']} CPUs), torch "
        f"{m['torch']}; load average {m['load_avg_before']:.1f} before, "
        f"{m['load_avg_after']:.1f} after. {m['seconds']:.0f} s in all.",
        "",
        "## Per value, per byte",
        "",
        "A TVM partition `k` inputs -> `k` outputs (`x_i + 1`) run as the in-process executor "
        "runs a stage (`StageRunner`: argument conversion, the VM call, the outputs' host copy, "
        "the stage's records); the fastest of short rounds (`calibration.timing.time_call`).",
        "",
        "| values in (and out) | bytes in | stage us | runner call us |",
        "| --- | --- | --- | --- |",
    ]
    for r in pv["equal_bytes"]:
        lines.append(
            f"| {r['values']} | {r['bytes']} | {r['stage_us']:.1f} | {r['runner_us']:.1f} |"
        )
    for r in pv["one_value"]:
        lines.append(f"| {r['values']} | {r['bytes']} | {r['stage_us']:.1f} | - |")
    lines += [
        "",
        f"Slope: **{pv['us_per_value']:.1f} us per value** crossing (one input of the reading "
        f"stage and one output of the writing one; {pv['us_per_value_runner']:.1f} us of it in "
        f"the runner), {pv['us_per_kib']:.3f} us per KiB.",
    ]
    ss = result["sessions"]
    if ss:
        pred, rows = ss[0]["predicted_stages_ms"], ss[1:]
        a, b = list(pred)
        gaps = [r["gap"] for r in rows]
        lines += [
            "",
            f"## The sweep's two throughput plans: cut at {a} (one value crosses) and at {b} "
            "(two cross)",
            "",
            f"Predicted stages (profile alone): {a} "
            f"{', '.join(f'{t:.3f}' for t in pred[a])} ms; {b} "
            f"{', '.join(f'{t:.3f}' for t in pred[b])} ms. Measured as `cost_feedback.py` "
            f"measures a sweep (interleaved, 30 warm runs, 0.25 quantile), {len(rows)} sessions:",
            "",
            f"| session | load | {a} stages ms | {b} stages ms | gap (slowest stage) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for i, r in enumerate(rows):
            lines.append(
                f"| {i + 1} | {r['load']:.2f} | {', '.join(f'{t:.3f}' for t in r[a])} | "
                f"{', '.join(f'{t:.3f}' for t in r[b])} | {100 * r['gap']:.1f}% |"
            )
        lines += [
            "",
            f"Gap: {100 * min(gaps):.1f}% to {100 * max(gaps):.1f}% "
            f"(median {100 * float(np.median(gaps)):.1f}%).",
        ]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/crossing_values.json"))
    ap.add_argument("--md", default=str(ROOT / "benchmarks/results/crossing_values.md"))
    args = ap.parse_args()
    t0, load_before = time.time(), os.getloadavg()[0]
    registry = default_registry()
    result = {
        "per_value": per_value(registry, ArtifactCache()),
        "sessions": sessions(args.sessions) if args.sessions else [],
        "meta": {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "cpus": os.cpu_count(), "torch": torch.__version__,
                 "seconds": time.time() - t0, "load_avg_before": load_before,
                 "load_avg_after": os.getloadavg()[0],
                 "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python "
                 f"benchmarks/crossing_values.py --sessions {args.sessions}"},
    }  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=2))
    Path(args.md).write_text(markdown(result))
    print(json.dumps(result["per_value"], indent=2))


if __name__ == "__main__":
    main()
