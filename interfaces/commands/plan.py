"""`hetero plan`: partition a model over a cluster and show the plan (nothing compiled)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from hetero.cluster.reference import resolve_cluster
from hetero.interfaces.api import plan as make_plan
from hetero.interfaces.commands.options import (
    cluster_option,
    json_option,
    load,
    objective_option,
    out_option,
)
from hetero.interfaces.devicemap import device_map
from hetero.interfaces.modelref import load_factory
from hetero.interfaces.pretrained import PREFIX as HF_PREFIX
from hetero.interfaces.pretrained import load_hf
from hetero.interfaces.terminal import Activity, make_console, print_json
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import Objective
from hetero.partitioner.graph import capture


def plan(
    target: str = typer.Argument(
        ..., help="A deploy config (.yaml) or a model 'pkg.module:factory'."
    ),
    cluster: str | None = cluster_option(),
    objective: Objective | None = objective_option(),
    microbatches: int = typer.Option(1, "--microbatches", help="For throughput plans."),
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
        None, "--profile", help="Calibration profile (default: the cached one for the cluster)."
    ),
    out: Path | None = out_option("the plan as JSON"),
    draw: Path | None = typer.Option(None, "--draw", help="Write a picture (.png or .svg)."),
    device_map_out: Path | None = typer.Option(
        None,
        "--device-map",
        help="Write the plan as an accelerate device_map (JSON: module -> cuda:N / cpu), "
        "for from_pretrained(device_map=...).",
    ),
    as_json: bool = json_option(),
) -> None:
    """Partition a model over a cluster; print the explain table, write plan.json and a picture.

    The model may have no weights (a transformers config built on the meta device, or a
    factory called with device="meta"): planning needs only shapes."""

    console = make_console()
    kwargs: dict = {}
    if target.endswith((".yaml", ".yml")):
        cfg = load(Path(target), cluster, objective)
        loaded = cfg.load_model(weights=False)
        model, inputs, dynamic = loaded.module, loaded.example_inputs, loaded.dynamic_shapes
        spec = cfg.cluster_spec()
        objective = cfg.objective
        kwargs = {
            "backends": cfg.backend_assignment,
            "pins": dict(cfg.constraints.pins) or None,
        }
    else:
        if target.startswith(HF_PREFIX):
            model, inputs = load_hf(target, where="model")
        else:
            model, inputs = load_factory(target, where="model")
        dynamic = None
        spec = resolve_cluster(cluster or "local", where="--cluster")
    objective = objective or Objective.LATENCY
    with Activity() as activity:
        with activity.step("capturing with torch.export"):
            graph = capture(model, inputs, dynamic_shapes=dynamic)
        cost_model = CostModel.load(profile, cluster=spec)
        with activity.step("planning") as say:
            result = make_plan(
                graph,
                spec,
                objective,
                microbatches=microbatches,
                cost_model=cost_model,
                algorithm=algorithm,
                time_budget_s=time_budget,
                progress=lambda phase, spent, budget: say(
                    f"planning: {phase}" + (f" ({spent:.1f} of {budget:g} s)" if budget else "")
                ),
                **kwargs,
            )
    written = []
    if out is not None:
        result.to_json(out)
        written.append(("plan", out))
    if draw is not None:
        written.append(("picture", result.draw(draw)))
    if device_map_out is not None:
        mapping = device_map(model, graph, result, spec)
        device_map_out.write_text(json.dumps(mapping, indent=2) + "\n")
        written.append(("device_map", device_map_out))
    if as_json:
        print_json({**result.to_dict(), "written": {k: str(v) for k, v in written}})
        return
    console.print(result.explain(width=console.width), end="", highlight=False, markup=False)
    for what, path in written:
        console.print(f"wrote {what} {path}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command()(plan)
