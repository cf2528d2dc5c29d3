"""`hetero bench CONFIG`: eager vs compiled (p10/p50/p90 of the timed runs, and the threads
they ran with), and per partition predicted vs measured."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import typer
from rich.table import Table

from hetero.interfaces.commands.bench_generate import bench_generation, generation_table
from hetero.interfaces.commands.options import (
    RUNS,
    WARMUP,
    cluster_option,
    config_argument,
    json_option,
    load,
    objective_option,
    out_option,
    runs_option,
    warmup_option,
)
from hetero.interfaces.config import DeployConfig, load_config
from hetero.interfaces.deploy import build_compiled
from hetero.interfaces.terminal import Activity, Report, make_console, print_json
from hetero.interfaces.timing import spread, thread_settings, timed_ms
from hetero.partitioner.decisions import Objective, Task


def _max_diff(a: Any, b: Any) -> float:
    xs = a if isinstance(a, tuple | list) else (a,)
    ys = b if isinstance(b, tuple | list) else (b,)
    diffs = [
        float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        for x, y in zip(xs, ys, strict=True)
        if isinstance(x, torch.Tensor)
    ]
    return max(diffs, default=0.0)


def bench_config(
    config: Path | DeployConfig,
    runs: int = RUNS,
    warmup: int = WARMUP,
    report: Report | None = None,
) -> dict[str, Any]:
    """Numbers for one config: eager and compiled times (p10/p50/p90 over `runs`; the
    `*_ms` keys are the medians), the threads they ran with, each partition's times."""

    cfg = config if isinstance(config, DeployConfig) else load_config(config)
    loaded = cfg.load_model()
    model, example = loaded.module, loaded.example_inputs
    cm = build_compiled(cfg, loaded=loaded, report=report)
    try:
        with torch.inference_mode():
            eager_out = model(*example)
            compiled_out = cm(*example)
            # both timed in this process's pools: a partition that loads sizes them (TVM)
            eager = spread(timed_ms(lambda: model(*example), runs, warmup))
            compiled = spread(timed_ms(lambda: cm(*example), runs, warmup))
            eager_ms, compiled_ms = eager["p50"], compiled["p50"]
        plan = cm.plan
        measured = dict(plan.measured_ms)
        partitions = [
            {
                "partition": p.index,
                "device": p.device,
                "backend": p.backend,
                "ops": len(p.nodes),
                "predicted_ms": p.predicted_ms,
                "measured_ms": measured.get(p.index),
                "emulated": p.emulated,
            }
            for p in plan.partitions
        ]
        return {
            "config": cfg.source or str(config),
            "model": cfg.model,
            "cluster": plan.cluster,
            "objective": plan.objective,
            "runs": runs,
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
            "eager": eager,
            "compiled": compiled,
            "threads": thread_settings(cm.cluster),
            "speedup": eager_ms / compiled_ms if compiled_ms else None,
            "predicted_ms": plan.predicted_ms,
            "max_abs_diff": _max_diff(eager_out, compiled_out),
            "partitions": partitions,
        }
    finally:
        cm.shutdown()


def _table(result: dict[str, Any]):
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.3f}"

    def p(key: str) -> str:
        t = result[key]
        return f"{t['p50']:.3f} ms (p10 {t['p10']:.3f}, p90 {t['p90']:.3f})"

    threads = result["threads"]
    devices = ", ".join(f"{d} {n}" for d, n in threads.get("devices", {}).items())
    t = Table(
        title=(
            f"{result['model']} on {result['cluster']} ({result['objective']}), "
            f"{result['runs']} runs: eager {p('eager')}, hetero {p('compiled')}, "
            f"x{result['speedup']:.2f} (predicted {result['predicted_ms']:.3f} ms), "
            f"max |diff| {result['max_abs_diff']:.2e}\n"
            f"threads: torch {threads['torch']}"
            + (f"; {devices}" if devices else "")
            + ", "
            + ", ".join(f"{k}={v}" for k, v in threads["env"].items() if v)
        ),
        title_justify="left",
    )
    for col, justify in (
        ("partition", "right"),
        ("device", "left"),
        ("backend", "left"),
        ("ops", "right"),
        ("predicted ms", "right"),
        ("measured ms", "right"),
    ):
        t.add_column(col, justify=justify)
    for p in result["partitions"]:
        device = p["device"] + (" (emulated)" if p["emulated"] else "")
        t.add_row(
            str(p["partition"]),
            device,
            p["backend"],
            str(p["ops"]),
            ms(p["predicted_ms"]),
            ms(p["measured_ms"]),
        )
    return t


def register(app: typer.Typer) -> None:
    @app.command()
    def bench(
        config: Path = config_argument(),
        cluster: str | None = cluster_option(),
        objective: Objective | None = objective_option(),
        runs: int = runs_option(),
        warmup: int = warmup_option(),
        as_json: bool = json_option(),
        out: Path | None = out_option("the JSON too"),
    ) -> None:
        """Time CONFIG's model eagerly and compiled by hetero; predicted vs measured per partition.

        A `task: generate` config: time to first token and ms per token (p10/p50/p90),
        hetero against transformers' eager generate of the same model and prompt.
        """

        cfg = load(config, cluster, objective)
        with Activity() as activity, activity.step("loading, planning, compiling, timing"):
            if cfg.task is Task.GENERATE:  # time to first token and ms per token
                result = bench_generation(cfg, runs=runs, warmup=warmup)
                table = generation_table(result)
            else:
                result = bench_config(cfg, runs, warmup, activity.counter())
                table = _table(result)
        if out is not None:
            out.write_text(json.dumps(result, indent=2, default=str))
        if as_json:
            print_json(result)
        else:
            make_console().print(table)
