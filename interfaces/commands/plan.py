"""`hetero plan`: partition a model over a cluster and show the plan (nothing compiled)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.cluster.reference import resolve_cluster
from hetero.partitioner.decisions import Objective


def plan(
    target: str = typer.Argument(..., help="deploy config (.yaml) or a model 'pkg.module:factory'"),
    cluster: str | None = typer.Option(
        None, "--cluster", help="cluster YAML or 'local' (default: the config's, else local)"
    ),
    objective: Objective | None = typer.Option(
        None, "--objective", help="what to minimise (default: the config's, else latency)"
    ),
    microbatches: int = typer.Option(1, "--microbatches", help="for throughput plans"),
    algorithm: str | None = typer.Option(
        None, "--algorithm", help="latency | throughput | exhaustive"
    ),
    profile: Path | None = typer.Option(
        None, "--profile", help="calibration profile (default: the cached one for the cluster)"
    ),
    out: Path | None = typer.Option(None, "--out", help="write the plan as JSON here"),
    draw: Path | None = typer.Option(None, "--draw", help="write a picture (.png or .svg)"),
) -> None:
    """Partition a model over a cluster; print the explain table, write plan.json and a picture."""
    from hetero.interfaces.api import plan as make_plan
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.graph import capture

    console = Console()
    kwargs: dict = {}
    if target.endswith((".yaml", ".yml")):
        from hetero.interfaces.config import load_config

        cfg = load_config(target)
        loaded = cfg.load_model()
        model, inputs, dynamic = loaded.module, loaded.example_inputs, loaded.dynamic_shapes
        spec = cfg.cluster_spec() if cluster is None else resolve_cluster(cluster)
        objective = objective or cfg.objective
        kwargs = {
            "backends": cfg.backend_assignment,
            "pins": dict(cfg.constraints.pins) or None,
        }
    else:
        from hetero.interfaces.modelref import load_factory

        model, inputs = load_factory(target, where="model")
        dynamic = None
        spec = resolve_cluster(cluster or "local")
    objective = objective or Objective.LATENCY
    with console.status("capturing with torch.export"):
        graph = capture(model, inputs, dynamic_shapes=dynamic)
    cost_model = CostModel.load(profile, cluster=spec)
    with console.status("planning"):
        result = make_plan(
            graph,
            spec,
            objective,
            microbatches=microbatches,
            cost_model=cost_model,
            algorithm=algorithm,
            **kwargs,
        )
    console.print(result.explain(width=console.width), end="", highlight=False, markup=False)
    if out is not None:
        result.to_json(out)
        console.print(f"wrote {out}")
    if draw is not None:
        result.draw(draw)
        console.print(f"wrote {draw}")


def register(app: typer.Typer) -> None:
    app.command()(plan)
