"""`hetero demo`: the main job on the embedded default (configs/demo.yaml): capture the
bundled model, plan it over this machine's CPU and an emulated NPU, compile every
partition, run it through the runtime and compare with eager."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer

from hetero.backends.registry import default_registry
from hetero.calibration import calibrate, versions_string
from hetero.cluster.profile import CalibrationProfile, default_profile_path
from hetero.errors import HeteroError
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.api import plan as make_plan
from hetero.interfaces.commands.options import (
    cluster_option,
    json_option,
    load,
    objective_option,
    runs_option,
)
from hetero.interfaces.report import graph_table
from hetero.interfaces.terminal import Activity, make_console, print_json
from hetero.interfaces.timing import spread, timed_ms
from hetero.partitioner import capture
from hetero.partitioner.decisions import Objective

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo(
    config: Path = typer.Argument(
        DEFAULT_CONFIG, help="A deploy config (default: configs/demo.yaml)."
    ),
    cluster: str | None = cluster_option(),
    objective: Objective | None = objective_option(),
    out: Path = typer.Option(
        Path("out/demo"), "--out", "-o", help="Write plan.json and plan.png into this folder."
    ),
    runs: int = runs_option(),
    calibrate: bool = typer.Option(
        None,
        "--calibrate/--no-calibrate",
        help="Measure this machine through the config's backends first (default: only when "
        "no profile for this cluster is cached yet; the plan then uses it).",
        show_default=False,
    ),
    as_json: bool = json_option(),
) -> None:
    """Capture, plan, compile and run the demo model; compare with eager."""

    console = make_console()
    show = (lambda *a, **k: None) if as_json else console.print
    cfg = load(config, cluster, objective)
    loaded = cfg.load_model()
    model, inputs = loaded.module, loaded.example_inputs
    spec = cfg.cluster_spec()
    if not as_json:
        console.rule(f"[bold]hetero demo[/]: {cfg.model} on {spec.name}")
    show(spec.summary(), highlight=False)

    with Activity() as activity:
        profile = _calibrate_once(show, activity, cfg, spec, calibrate)
        with activity.step("capturing with torch.export"):
            graph = capture(model, inputs, loaded.dynamic_shapes)
        show(graph_table(graph, depth=1))
        with activity.step("planning"):
            plan = make_plan(graph, spec, cfg.objective, backends=cfg.backend_assignment)
        out.mkdir(parents=True, exist_ok=True)
        plan.to_json(out / "plan.json")
        picture = plan.draw(out / "plan.png")
        show(plan.explain(width=console.width), highlight=False, markup=False)
        show(f"plan written to {out / 'plan.json'}, picture to {picture}", highlight=False)

        start = time.perf_counter()
        with activity.step("compiling and starting the runtime"):
            cm = hetero_compile(
                model,
                inputs,
                cluster=spec,
                graph=graph,
                plan=plan,
                progress=activity.counter(),
                **cfg.compile_kwargs(),
            )
    seconds = time.perf_counter() - start
    show(f"compiled and started in {seconds:.1f} s ({type(cm.executor).__name__})")
    try:
        with torch.no_grad():
            ref = model(*inputs)
            got = cm(*inputs)
            times = timed_ms(lambda: cm(*inputs), runs, 0)
        err = float((got - ref).abs().max() / ref.abs().max())
        if as_json:
            print_json(
                {
                    "model": cfg.model,
                    "cluster": spec.name,
                    "profile": str(profile) if profile else None,
                    "compile_s": seconds,
                    "executor": type(cm.executor).__name__,
                    "max_rel_err": err,
                    "matches_eager": err < 1e-4,
                    "ms": spread(times),
                    "plan": cm.plan.to_dict(),
                }
            )
            return
        verdict = "[green]matches eager[/]" if err < 1e-4 else "[red]DIFFERS from eager[/]"
        console.print(f"max relative error vs eager: {err:.2e} — {verdict}")
        console.print(cm.plan.explain(width=console.width), highlight=False, markup=False)
    finally:
        cm.shutdown()


def _calibrate_once(show, activity: Activity, cfg, cluster, wanted: bool | None) -> Path | None:
    """Fit the cost model to this machine as the demo's backends run it (about a minute,
    once: the profile is cached where every later plan of this cluster finds it)."""

    path = default_profile_path(cluster.name)
    current = path.exists() and not _stale(path)
    if wanted is False or (wanted is None and current):
        if path.exists():
            show(f"cost model: calibrated profile {path}", highlight=False)
            return path
        return None
    start = time.perf_counter()
    with activity.step("calibrating the cost model on this machine (once)") as say:
        profile, _, _ = calibrate(
            cluster,
            backends=cfg.backend_assignment,
            quick=True,
            emulated=True,
            log=say,
            progress=activity.counter(),
        )
    profile.to_json(path)
    show(
        f"cost model: calibrated in {time.perf_counter() - start:.0f} s, profile {path} "
        "(hetero calibrate --config ... measures more)",
        highlight=False,
    )
    return path


def _stale(path: Path) -> bool:
    """A profile measured through other versions of its backends (a TVM lowering that has
    changed since prices kernels that no longer exist)."""

    try:
        profile = CalibrationProfile.load(path)
        registry = default_registry()
        return any(
            d.backend_versions and d.backend_versions != versions_string(registry.get(d.backend))
            for d in profile.devices
        )
    except (HeteroError, KeyError):
        return True


def register(app: typer.Typer) -> None:
    app.command()(demo)
