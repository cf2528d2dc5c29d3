"""Predicted vs measured time of the demo's partitions, after calibrating this machine.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cost_accuracy.py \\
        [--profile PATH] [--quick] [--no-groups] [--json benchmarks/results/cost_accuracy.json]

1. Calibrates this machine through the backends configs/demo.yaml maps each device kind to
   (TVM for the CPU and for the emulated NPU, whose partitions compile for this host and
   run here), as `hetero calibrate --config configs/demo.yaml --emulated` does; or loads
   `--profile`.
2. Plans the demo exactly as configs/demo.yaml does (tiny_gpt batch 1 x 64 tokens on
   dev-box-npu, objective throughput), priced with that profile.
3. Compiles each partition with TVM (artifact cache: a second run skips compilation), loads
   it on its device (threads as the device spec says: TVM's and torch's pools) and times its
   runner in this process, warm: the fastest of many short rounds (`time_call`), as the
   calibration times its microbenchmarks.
4. Unless --no-groups: the same per coarse group (the unit the planner places), on the CPU:
   block 0's groups and those outside the blocks (--all-groups: every group).

Goal: each CPU partition within 25%. OMP_WAIT_POLICY=PASSIVE (set below unless already set,
as tools/demo and tools/test export it): OpenMP threads sleep instead of spinning between
parallel regions, so the 2 cores are not burnt by idle spinners of the other runtime (torch's
BLAS vs TVM's pool). The JSON records the load average: the box is shared.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch/TVM start their pools

import argparse
import json
import platform
import statistics
import time
from dataclasses import asdict
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from hetero.backends.cache import ArtifactCache
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.registry import default_registry
from hetero.backends.units import units_for
from hetero.calibration import calibrate, fit_errors, sample_prediction, time_call
from hetero.cluster.profile import CalibrationProfile
from hetero.interfaces.api import plan as make_plan
from hetero.interfaces.config import load_config
from hetero.partitioner.cost import CostModel
from hetero.partitioner.graph import capture

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs/demo.yaml"


def time_units(graph, assignment, inputs, devices, backends, cache, budget):
    """Compile the partitions of `assignment` (partition i on devices[i] through
    backends[i]), load them and time each runner; (min s, median s) per partition."""
    _, units, env = units_for(graph, assignment, *inputs)
    return time_compiled(units, env, devices, backends, cache, budget)


def time_compiled(units, env, devices, backends, cache, budget):
    """(fastest round s, median of 15 single calls s) per CompileUnit, each compiled through
    its backend for its device (artifact cache), loaded and called on its example inputs."""
    jobs = [CompileJob(u, d, b) for u, d, b in zip(units, devices, backends, strict=True)]
    arts = compile_units(jobs, cache, progress=False)
    registry = default_registry()
    out = []
    with torch.no_grad():
        for u, art, d, b in zip(units, arts, devices, backends, strict=True):
            run = registry.get(b).load(art, d)
            args = [env[a] for a in u.inputs]
            best = time_call(lambda run=run, args=args: run(*args), budget=budget)
            rounds = []
            for _ in range(15):
                t0 = time.perf_counter()
                run(*args)
                rounds.append(time.perf_counter() - t0)
            out.append((best, statistics.median(rounds)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--profile", default=None, help="use this profile instead of calibrating")
    ap.add_argument("--quick", action="store_true", help="quick calibration (fewer samples)")
    ap.add_argument("--no-groups", action="store_true", help="skip the per-group table")
    ap.add_argument(
        "--all-groups",
        action="store_true",
        help="time every group (default: block 0's and those outside the blocks; blocks 1-3 "
        "repeat block 0's)",
    )
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--json", default=str(ROOT / "benchmarks/results/cost_accuracy.json"))
    args = ap.parse_args()
    t_start = time.time()
    load_before = os.getloadavg()
    cache = ArtifactCache(args.cache)
    cfg = load_config(CONFIG)
    cluster = cfg.cluster_spec()
    backends = cfg.backend_assignment
    registry = default_registry()

    samples: dict = {}
    t0 = time.time()
    if args.profile:
        profile = CalibrationProfile.load(args.profile)
    else:
        profile, _, samples = calibrate(
            cluster, backends=backends, quick=args.quick, emulated=True, cache=cache
        )
        print(f"calibrated in {time.time() - t0:.0f} s")
    t_calibrate = time.time() - t0
    sample_rows = []
    for dp in profile.devices:
        for s in samples.get((dp.device, dp.backend), []):
            sample_rows.append(
                {
                    "device": dp.device,
                    "backend": dp.backend,
                    "class": s.op_class,
                    "label": s.label,
                    "flops": s.flops,
                    "bytes": s.nbytes,
                    "measured_us": 1e6 * s.seconds,
                    "fitted_us": 1e6 * sample_prediction(dp, s),
                }
            )
    # the backends that fuse say so themselves (Backend.fuses)
    fusing = frozenset(n for n in backends.names() if registry.get(n).fuses)
    cm = CostModel(profile, fusing_backends=fusing)
    fits = Table(title="calibration (per device, backend, op class)")
    for col in ("device", "backend", "class", "e_c", "e_m", "overhead us", "fit err", "n"):
        fits.add_column(col)
    for dev, bk, cls, ec, em, ov, err, n in fit_errors(profile):
        fits.add_row(
            dev, bk, cls, f"{ec:.3f}", f"{em:.3f}", f"{ov * 1e6:.1f}", f"{100 * err:.0f}%", str(n)
        )
    Console().print(fits)

    loaded = cfg.load_model()
    graph = capture(loaded.module, loaded.example_inputs)
    plan = make_plan(
        graph,
        cluster,
        cfg.objective,
        cost_model=cm,
        backends=backends,
        pins=dict(cfg.constraints.pins) or None,
    )
    devices = [cluster.device(p.device) for p in plan.partitions]
    times = time_units(
        graph,
        plan.assignment(),
        loaded.example_inputs,
        devices,
        [p.backend for p in plan.partitions],
        cache,
        budget=2.0,
    )
    rows = []
    for p, d, (best, med) in zip(plan.partitions, devices, times, strict=True):
        rows.append(
            {
                "kind": "partition",
                "name": f"p{p.index}",
                "device": d.name,
                "backend": p.backend,
                "ops": len(p.nodes),
                "predicted_ms": p.predicted_ms,
                "measured_ms": 1e3 * best,
                "median_ms": 1e3 * med,
            }
        )

    if not args.no_groups:
        cpu = next(d for d in cluster.devices if d.kind == "cpu")
        bk = backends.for_kind("cpu")
        groups = graph.coarsen()
        assignment = {n: i for i, g in enumerate(groups) for n in g.nodes}
        # compile and time only the groups shown (the others still form their own units)
        shown = [
            i
            for i, g in enumerate(groups)
            if args.all_groups or not g.name.startswith("blocks.") or g.name.startswith("blocks.0")
        ]
        _, units, env = units_for(graph, assignment, *loaded.example_inputs)
        gtimes = time_compiled(
            [units[i] for i in shown], env, [cpu] * len(shown), [bk] * len(shown), cache, 0.3
        )
        groups = [groups.groups[i] for i in shown]
        for g, (best, med) in zip(groups, gtimes, strict=True):
            ops = [graph[n] for n in g.nodes]
            pred = cm.group_time(g, ops, cpu, backend=bk) + cm.call_overhead(cpu, bk)
            rows.append(
                {
                    "kind": "group",
                    "name": g.name,
                    "device": cpu.name,
                    "backend": bk,
                    "ops": len(g.nodes),
                    "predicted_ms": 1e3 * pred,
                    "measured_ms": 1e3 * best,
                    "median_ms": 1e3 * med,
                }
            )
        grows = [r for r in rows if r["kind"] == "group"]
        rows.append(
            {
                "kind": "sum",
                "name": "all groups" if args.all_groups else "groups shown",
                "device": cpu.name,
                "backend": bk,
                "ops": sum(r["ops"] for r in grows),
                "predicted_ms": sum(r["predicted_ms"] for r in grows),
                "measured_ms": sum(r["measured_ms"] for r in grows),
                "median_ms": sum(r["median_ms"] for r in grows),
            }
        )

    table = Table(title="demo (configs/demo.yaml): predicted vs measured, warm, in-process")
    for col in ("kind", "name", "device", "ops", "predicted ms", "measured ms", "median", "error"):
        table.add_column(col)
    for r in rows:
        r["error"] = (r["predicted_ms"] - r["measured_ms"]) / r["measured_ms"]
        table.add_row(
            r["kind"],
            r["name"],
            r["device"],
            str(r["ops"]),
            f"{r['predicted_ms']:.3f}",
            f"{r['measured_ms']:.3f}",
            f"{r['median_ms']:.3f}",
            f"{100 * r['error']:+.1f}%",
        )
    Console().print(table)
    summary = {}
    for kind in ("partition", "group"):
        errs = [abs(r["error"]) for r in rows if r["kind"] == kind]
        if errs:
            summary[kind] = {"mean_abs_error": statistics.mean(errs), "max_abs_error": max(errs)}
    cpu_parts = [r for r in rows if r["kind"] == "partition" and r["device"].endswith("cpu")]
    summary["cpu_partitions_within_25pct"] = all(abs(r["error"]) <= 0.25 for r in cpu_parts)
    for k, v in summary.items():
        print(f"{k}: {v}")
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/cost_accuracy.py",
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k, "") for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "load_avg_before": load_before,
        "load_avg_after": os.getloadavg(),
        "seconds": time.time() - t_start,
        "calibration_seconds": t_calibrate,
        "plan_notes": list(plan.notes) if hasattr(plan, "notes") else [],
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(
        json.dumps(
            {
                "meta": meta,
                "summary": summary,
                "rows": rows,
                "samples": sample_rows,
                "profile": asdict(profile),
            },
            indent=2,
        )
    )
    print(f"wrote {args.json} in {time.time() - t_start:.0f} s")


if __name__ == "__main__":
    main()
