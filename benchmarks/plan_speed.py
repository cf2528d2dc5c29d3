"""How long planning takes: GPT-2 (12 layers, random weights) against every cluster file.

    python benchmarks/plan_speed.py [--json benchmarks/results/plan_speed.json]

Capture is timed once and left out; each plan is timed warm (the backend registry loaded)
for both objectives. Goal: under 2 s per plan on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import hetero
from hetero.backends.registry import default_registry

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/plan_speed.json"))
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args()
    from transformers import GPT2Config, GPT2Model

    torch.manual_seed(0)
    model = GPT2Model(GPT2Config(use_cache=False)).eval()
    inputs = (torch.randint(0, 50257, (1, args.seq)),)
    t0 = time.perf_counter()
    graph = hetero.capture(model, inputs)
    capture_s = time.perf_counter() - t0
    registry = default_registry()
    t0 = time.perf_counter()
    hetero.plan(
        graph, hetero.Cluster.from_yaml(ROOT / "configs/clusters/cpu-2core.yaml"), registry=registry
    )
    cold_s = time.perf_counter() - t0  # includes importing the backends asked about
    rows = []
    for path in sorted((ROOT / "configs/clusters").glob("*.yaml")):
        cluster = hetero.Cluster.from_yaml(path)
        for objective in ("latency", "throughput"):
            t0 = time.perf_counter()
            plan = hetero.plan(graph, cluster, objective, registry=registry)
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "cluster": path.stem,
                    "objective": objective,
                    "seconds": dt,
                    "groups": sum(len(p.groups) for p in plan.partitions),  # after refining
                    "partitions": len(plan.partitions),
                    "devices": list(plan.devices()),
                    "predicted_ms": plan.predicted_ms,
                }
            )
    t = Table(
        title=f"GPT-2 ({len(graph)} ops) planning time; capture {capture_s:.1f} s, first plan {cold_s:.2f} s"
    )
    for col in (
        "cluster",
        "objective",
        "groups",
        "partitions",
        "devices",
        "predicted ms",
        "plan s",
    ):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["cluster"], r["objective"], str(r["groups"]), str(r["partitions"]),
            ", ".join(d.split("/")[-1] for d in r["devices"]), f"{r['predicted_ms']:.3f}",
            f"{r['seconds']:.3f}",
        )  # fmt: skip
    Console().print(t)
    out = {"ops": len(graph), "capture_s": capture_s, "first_plan_s": cold_s, "plans": rows}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
