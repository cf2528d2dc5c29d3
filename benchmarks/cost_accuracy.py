"""Predicted vs measured time of the demo model's CPU partitions, after calibrating here.

    python benchmarks/cost_accuracy.py [--profile PATH] [--json benchmarks/results/cost_accuracy.json]

Calibrates this machine's CPU (unless --profile names a profile), plans the demo config
(configs/demo.yaml: tiny_gpt on dev-box-npu) on its CPU alone with eager, so that what runs
is what was priced, and times the partition with eager torch; then does the same with one
partition per coarse group (the unit the planner places), for a finer view. Goal: within 25%.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import hetero
from hetero.cluster.models import tiny_gpt
from hetero.partitioner.calibrate import calibrate, time_call
from hetero.partitioner.cost import CalibrationProfile, CostModel
from hetero.partitioner.split import flatten_inputs, param_values, split

ROOT = Path(__file__).resolve().parents[1]


def measure(graph, parts, inputs, budget: float = 0.3) -> list[float]:
    env = dict(param_values(graph))
    env.update(flatten_inputs(graph, inputs))
    times = []
    with torch.no_grad():
        for p in parts:
            times.append(time_call(lambda p=p: p(env), budget=budget))
            env.update(zip(p.outputs, p(env), strict=True))
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/cost_accuracy.json"))
    args = ap.parse_args()
    # One thread: on a shared 2-core machine a 2-thread parallel region waits at its barrier
    # whenever the other thread is descheduled, which times the neighbours, not the op.
    # Calibration below then measures with the same single thread.
    torch.set_num_threads(args.threads)
    cluster = hetero.Cluster.from_yaml(ROOT / "configs/clusters/dev-box-npu.yaml")
    if args.profile:
        profile = CalibrationProfile.load(args.profile)
    else:
        profile, _, _ = calibrate(cluster)
    cm = CostModel(profile)
    cpu = cluster.device("local/cpu")
    model, inputs = tiny_gpt()
    graph = hetero.capture(model, inputs)
    rows = []

    # the whole model as one CPU partition, as the planner prices it
    plan = hetero.plan(
        graph, cluster, cost_model=cm, backends={"cpu": "eager"}, exclude=["local/npu"]
    )
    parts = split(graph, plan.assignment())
    times = measure(graph, parts, inputs, budget=3.0)  # long calls: more rounds for a quiet one
    for pp, t in zip(plan.partitions, times, strict=True):
        rows.append(("model", f"p{pp.index} ({len(pp.nodes)} ops)", pp.predicted_ms, 1e3 * t))

    groups = graph.coarsen()
    assignment = {n: i for i, g in enumerate(groups) for n in g.nodes}
    parts = split(graph, assignment)
    times = measure(graph, parts, inputs)
    for g, t in zip(groups, times, strict=True):
        ops = [graph[n] for n in g.nodes]
        pred = 1e3 * (cm.group_time(g, ops, cpu, backend="eager") + cm.call_overhead(cpu))
        rows.append(("group", g.name, pred, 1e3 * t))

    group_rows = [r for r in rows if r[0] == "group"]
    rows.append(
        (
            "sum",
            "all groups",
            sum(r[2] for r in group_rows),
            sum(r[3] for r in group_rows),
        )
    )
    table = Table(title="tiny_gpt on local/cpu (eager): predicted vs measured")
    for col in ("kind", "partition", "predicted ms", "measured ms", "error"):
        table.add_column(col)
    errors = {"model": [], "group": [], "sum": []}
    for kind, name, pred, meas in rows:
        err = (pred - meas) / meas
        errors[kind].append(abs(err))
        table.add_row(kind, name, f"{pred:.3f}", f"{meas:.3f}", f"{100 * err:+.1f}%")
    Console().print(table)
    summary = {
        k: {"mean_abs_error": statistics.mean(v), "max_abs_error": max(v)}
        for k, v in errors.items()
        if v
    }
    for k, v in summary.items():
        print(
            f"{k}: mean |error| {100 * v['mean_abs_error']:.1f}%, max {100 * v['max_abs_error']:.1f}%"
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "rows": [
                    dict(zip(("kind", "partition", "predicted_ms", "measured_ms"), r, strict=True))
                    for r in rows
                ],
                "summary": summary,
            },
            indent=2,
        )
    )
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
