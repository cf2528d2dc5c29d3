"""`hetero demo`: the main job on the embedded default (configs/demo.yaml): capture the
bundled model, plan it over this machine's CPU and an emulated NPU, compile every
partition, run it through the runtime and compare with eager."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import typer
from rich.console import Console

from hetero.backends.registry import default_registry
from hetero.calibration import calibrate, versions_string
from hetero.cluster.profile import CalibrationProfile, default_profile_path
from hetero.errors import HeteroError
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.api import plan as make_plan
from hetero.interfaces.config import load_config
from hetero.interfaces.report import graph_table
from hetero.partitioner import capture

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo.yaml"


def demo(
    config: Path = typer.Argument(
        DEFAULT_CONFIG, help="deploy config (default: configs/demo.yaml)"
    ),
    out: Path = typer.Option(Path("out/demo"), help="where plan.json and plan.png go"),
    runs: int = typer.Option(5, help="timed runs after the first"),
    calibrate: bool = typer.Option(
        None,
        "--calibrate/--no-calibrate",
        help="measure this machine through the config's backends first (default: only when "
        "no profile for this cluster is cached yet; the plan then uses it)",
        show_default=False,
    ),
) -> None:
    """Capture, plan, compile and run the demo model; compare with eager."""

    # Plan tables are wide: keep them whole when the output is a file or a CI log.
    console = Console(width=None if sys.stdout.isatty() else 150)
    cfg = load_config(config)
    loaded = cfg.load_model()
    model, inputs = loaded.module, loaded.example_inputs
    cluster = cfg.cluster_spec()
    console.rule(f"[bold]hetero demo[/]: {cfg.model} on {cluster.name}")
    console.print(cluster.summary(), highlight=False)

    _calibrate_once(console, cfg, cluster, calibrate)

    with console.status("capturing with torch.export"):
        graph = capture(model, inputs, loaded.dynamic_shapes)
    console.print(graph_table(graph, depth=1))

    with console.status("planning"):
        plan = make_plan(graph, cluster, cfg.objective, backends=cfg.backend_assignment)
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


def _calibrate_once(console: Console, cfg, cluster, wanted: bool | None) -> None:
    """Fit the cost model to this machine as the demo's backends run it (about a minute,
    once: the profile is cached where every later plan of this cluster finds it)."""

    path = default_profile_path(cluster.name)
    current = path.exists() and not _stale(path)
    if wanted is False or (wanted is None and current):
        if path.exists():
            console.print(f"cost model: calibrated profile {path}", highlight=False)
        return
    start = time.perf_counter()
    with console.status("calibrating the cost model on this machine (once)") as status:
        profile, _, _ = calibrate(
            cluster,
            backends=cfg.backend_assignment,
            quick=True,
            emulated=True,
            log=status.update,
        )
    profile.to_json(path)
    console.print(
        f"cost model: calibrated in {time.perf_counter() - start:.0f} s, profile {path} "
        "(hetero calibrate --config ... measures more)",
        highlight=False,
    )


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
