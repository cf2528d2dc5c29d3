"""`hetero demo`: the main job on the embedded default (configs/demo.yaml): capture the
bundled model, plan it over this machine's CPU and an emulated NPU, compile every
partition, run it through the runtime and compare with eager."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer
from rich.console import Console

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo(
    config: Path = typer.Argument(
        DEFAULT_CONFIG, help="deploy config (default: configs/demo.yaml)"
    ),
    out: Path = typer.Option(Path("out/demo"), help="where plan.json and plan.png go"),
    runs: int = typer.Option(5, help="timed runs after the first"),
) -> None:
    """Capture, plan, compile and run the demo model; compare with eager."""
    import torch

    from hetero.cluster.api import compile as hetero_compile
    from hetero.cluster.config import load_config
    from hetero.cluster.report import graph_table
    from hetero.partitioner import capture
    from hetero.partitioner.algorithms import plan as make_plan

    # Plan tables are wide: keep them whole when the output is a file or a CI log.
    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = load_config(config)
    loaded = cfg.load_model()
    model, inputs = loaded.module, loaded.example_inputs
    cluster = cfg.cluster_spec()
    console.rule(f"[bold]hetero demo[/]: {cfg.model} on {cluster.name}")
    console.print(cluster.summary(), highlight=False)

    with console.status("capturing with torch.export"):
        graph = capture(model, inputs, loaded.dynamic_shapes)
    console.print(graph_table(graph, depth=1))

    with console.status("planning"):
        plan = make_plan(graph, cluster, cfg.objective, backends=dict(cfg.backends) or None)
    out.mkdir(parents=True, exist_ok=True)
    plan.to_json(out / "plan.json")
    picture = plan.draw(out / "plan.png")
    console.print(plan.explain(), highlight=False)
    console.print(f"plan written to {out / 'plan.json'}, picture to {picture}")

    start = time.perf_counter()
    with console.status(f"compiling {len(plan.partitions)} partitions and starting the runtime"):
        cm = hetero_compile(
            model, inputs, cluster=cluster, graph=graph, plan=plan, **cfg.compile_kwargs()
        )
    console.print(f"compiled and started in {time.perf_counter() - start:.1f} s "
                  f"({type(cm.executor).__name__})")  # fmt: skip
    try:
        with torch.no_grad():
            ref = model(*inputs)
            got = cm(*inputs)
            for _ in range(runs):
                cm(*inputs)
        err = float((got - ref).abs().max() / ref.abs().max())
        verdict = "[green]matches eager[/]" if err < 1e-4 else "[red]DIFFERS from eager[/]"
        console.print(f"max relative error vs eager: {err:.2e} — {verdict}")
        console.print(cm.plan.explain(), highlight=False)
    finally:
        cm.shutdown()


def register(app: typer.Typer) -> None:
    app.command()(demo)
