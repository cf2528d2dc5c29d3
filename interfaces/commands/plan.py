"""`hetero plan`: partition a model over a cluster and show the plan (nothing compiled)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.cluster.reference import resolve_cluster
from hetero.interfaces.api import plan as make_plan
from hetero.interfaces.config import load_config
from hetero.interfaces.modelref import load_factory
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import Objective
from hetero.partitioner.graph import capture


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
        None, "--algorithm", help="auto (default) | latency | throughput | exhaustive"
    ),
    time_budget: float | None = typer.Option(
        None,
        "--time-budget",
        help="seconds the planner may spend; it returns the best plan found and says "
        "whether it is proven optimal",
    ),
    profile: Path | None = typer.Option(
        None, "--profile", help="calibration profile (default: the cached one for the cluster)"
    ),
    out: Path | None = typer.Option(None, "--out", help="write the plan as JSON here"),
    draw: Path | None = typer.Option(None, "--draw", help="write a picture (.png or .svg)"),
) -> None:
    """Partition a model over a cluster; print the explain table, write plan.json and a picture.

    The model may have no weights (a transformers config built on the meta device, or a
    factory called with device="meta"): planning needs only shapes."""

    console = Console()
    kwargs: dict = {}
    if target.endswith((".yaml", ".yml")):
        cfg = load_config(target)
        loaded = cfg.load_model(weights=False)
        model, inputs, dynamic = loaded.module, loaded.example_inputs, loaded.dynamic_shapes
        spec = cfg.cluster_spec() if cluster is None else resolve_cluster(cluster)
        objective = objective or cfg.objective
        kwargs = {
            "backends": cfg.backend_assignment,
            "pins": dict(cfg.constraints.pins) or None,
        }
    else:
        model, inputs = load_factory(target, where="model")
        dynamic = None
        spec = resolve_cluster(cluster or "local")
    objective = objective or Objective.LATENCY
    with console.status("capturing with torch.export"):
        graph = capture(model, inputs, dynamic_shapes=dynamic)
    cost_model = CostModel.load(profile, cluster=spec)
    result = make_plan(
        graph,
        spec,
        objective,
        microbatches=microbatches,
        cost_model=cost_model,
        algorithm=algorithm,
        time_budget_s=time_budget,
        progress=True,
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
