"""`hetero bench CONFIG`: eager vs compiled, and per partition predicted vs measured."""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import typer
from rich.console import Console
from rich.table import Table

from hetero.interfaces.config import load_config
from hetero.interfaces.deploy import build_compiled


def _median_ms(fn: Callable[[], Any], runs: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _max_diff(a: Any, b: Any) -> float:
    xs = a if isinstance(a, tuple | list) else (a,)
    ys = b if isinstance(b, tuple | list) else (b,)
    diffs = [
        float((x.float() - y.float()).abs().max()) if x.numel() else 0.0
        for x, y in zip(xs, ys, strict=True)
        if isinstance(x, torch.Tensor)
    ]
    return max(diffs, default=0.0)


def bench_config(config: Path, runs: int = 20, warmup: int = 3) -> dict[str, Any]:
    """Numbers for one config: eager and compiled medians, and each partition's times."""

    cfg = load_config(config)
    loaded = cfg.load_model()
    model, example = loaded.module, loaded.example_inputs
    cm = build_compiled(cfg, loaded=loaded)
    try:
        with torch.inference_mode():
            eager_out = model(*example)
            compiled_out = cm(*example)
            eager_ms = _median_ms(lambda: model(*example), runs, warmup)
            compiled_ms = _median_ms(lambda: cm(*example), runs, warmup)
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
            "config": str(config),
            "model": cfg.model,
            "cluster": plan.cluster,
            "objective": plan.objective,
            "runs": runs,
            "eager_ms": eager_ms,
            "compiled_ms": compiled_ms,
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

    t = Table(
        title=(
            f"{result['model']} on {result['cluster']} ({result['objective']}): eager "
            f"{result['eager_ms']:.3f} ms, hetero {result['compiled_ms']:.3f} ms "
            f"(x{result['speedup']:.2f}, predicted {result['predicted_ms']:.3f} ms), "
            f"max |diff| {result['max_abs_diff']:.2e}"
        )
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
        config: Path = typer.Argument(..., help="A deploy config (see configs/deploy/)."),
        runs: int = typer.Option(20, min=1, help="Timed runs (the median is reported)."),
        warmup: int = typer.Option(3, min=0, help="Untimed runs first."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
        output: Path | None = typer.Option(None, "--output", "-o", help="Also write JSON here."),
    ) -> None:
        """Time CONFIG's model eagerly and compiled by hetero; predicted vs measured per partition."""

        result = bench_config(config, runs=runs, warmup=warmup)
        text = json.dumps(result, indent=2)
        if output is not None:
            output.write_text(text)
        if as_json:
            typer.echo(text)
        else:
            Console().print(_table(result))
