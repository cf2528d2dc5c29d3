"""`hetero compile`, `hetero run` and `hetero verify`: a deploy config's model through the
whole pipeline, without serving it."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import typer
from rich.console import Console
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileOptions
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.config import load_config
from hetero.runtime.verify import verify


def _compiled(config: Path, tune: int = 0, executor: str | None = None):
    cfg = load_config(config)
    loaded = cfg.load_model()
    kwargs = cfg.compile_kwargs()
    if executor:
        kwargs["executor"] = executor
    if tune:
        kwargs["options"] = CompileOptions(tune_trials=tune)
    cm = hetero_compile(
        loaded.module,
        loaded.example_inputs,
        cluster=cfg.cluster_spec(),
        dynamic_shapes=loaded.dynamic_shapes,
        pins=dict(cfg.constraints.pins) or None,
        **kwargs,
    )
    return cfg, loaded, cm


def compile_cmd(
    config: Path = typer.Argument(..., help="deploy config (YAML)"),
    tune: int = typer.Option(
        0, "--tune", help="autotuning trials per partition (TVM MetaSchedule)"
    ),
) -> None:
    """Plan and compile every partition into the artifact cache; print the plan."""
    console = Console()
    start = time.perf_counter()
    with console.status("planning and compiling"):
        _, _, cm = _compiled(config, tune, executor="local")
    console.print(cm.plan.explain(), highlight=False)
    for s in cm.stages:
        console.print(f"  p{s.index}: {s.backend} artifact {s.artifact.key} at {s.artifact.path}")
    console.print(f"compiled in {time.perf_counter() - start:.1f} s")
    cm.shutdown()


def run_cmd(
    config: Path = typer.Argument(..., help="deploy config (YAML)"),
    runs: int = typer.Option(10, help="timed runs"),
) -> None:
    """Compile, run the config's example inputs, compare with eager, show measured vs predicted."""

    console = Console()
    with console.status("planning, compiling, starting the runtime"):
        _, loaded, cm = _compiled(config)
    try:
        with torch.no_grad():
            ref = loaded.module(*loaded.example_inputs)
            got = cm(*loaded.example_inputs)
            start = time.perf_counter()
            for _ in range(runs):
                cm(*loaded.example_inputs)
            ms = (time.perf_counter() - start) * 1e3 / max(1, runs)
        diffs = [
            float((a.float() - b.float()).abs().max())
            for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref), strict=True)
            if isinstance(a, torch.Tensor)
        ]
        console.print(
            f"mean {ms:.2f} ms per request; max |compiled - eager| = {max(diffs, default=0):.2e}"
        )
        console.print(cm.plan.explain(), highlight=False)
    finally:
        cm.shutdown()


def verify_cmd(
    config: Path = typer.Argument(..., help="deploy config (YAML)"),
    rtol: float = typer.Option(1e-4, help="relative tolerance"),
    atol: float = typer.Option(1e-4, help="absolute tolerance"),
) -> None:
    """Run the plan and eager side by side; on a mismatch, find the first partition and op."""

    console = Console()
    with console.status("planning and compiling"):
        _, loaded, cm = _compiled(config, executor="local")
    try:
        report = verify(cm.graph, cm.stages, loaded.example_inputs, rtol=rtol, atol=atol)
    finally:
        cm.shutdown()
    console.print(report.table(), highlight=False)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
    app.command("run")(run_cmd)
    app.command("verify")(verify_cmd)
