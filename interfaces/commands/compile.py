"""`hetero compile`, `hetero run` and `hetero verify`: a deploy config's model through the
whole pipeline, without serving it."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
import typer
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileOptions
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.commands.options import (
    cluster_option,
    config_argument,
    json_option,
    load,
    objective_option,
    runs_option,
    warmup_option,
)
from hetero.interfaces.terminal import Activity, make_console, print_json
from hetero.interfaces.timing import spread
from hetero.partitioner.decisions import Objective
from hetero.runtime.verify import verify


def _compiled(
    config: Path,
    cluster: str | None,
    objective: Objective | None,
    activity: Activity,
    tune: int = 0,
    executor: str | None = None,
):
    cfg = load(config, cluster, objective)
    with activity.step(f"loading {cfg.model}"):
        loaded = cfg.load_model()
        spec = cfg.cluster_spec()
    kwargs = cfg.compile_kwargs()
    if executor:
        kwargs["executor"] = executor
    if tune:
        kwargs["options"] = CompileOptions(tune_trials=tune)
    with activity.step(f"capturing and planning for {spec.name}"):
        cm = hetero_compile(
            loaded.module,
            loaded.example_inputs,
            cluster=spec,
            dynamic_shapes=loaded.dynamic_shapes,
            pins=dict(cfg.constraints.pins) or None,
            progress=activity.counter(),
            **kwargs,
        )
    return cfg, loaded, cm


def compile_cmd(
    config: Path = config_argument(),
    cluster: str | None = cluster_option(),
    objective: Objective | None = objective_option(),
    tune: int = typer.Option(
        0, "--tune", help="Autotuning trials per partition (TVM MetaSchedule)."
    ),
    as_json: bool = json_option(),
) -> None:
    """Plan and compile every partition into the artifact cache; print the plan."""
    console = make_console()
    start = time.perf_counter()
    with Activity() as activity:
        _, _, cm = _compiled(config, cluster, objective, activity, tune, executor="local")
    seconds = time.perf_counter() - start
    try:
        artifacts = [
            {"partition": s.index, "backend": s.backend, "key": s.artifact.key,
             "path": str(s.artifact.path)}
            for s in cm.stages
        ]  # fmt: skip
        if as_json:
            print_json({"plan": cm.plan.to_dict(), "artifacts": artifacts, "seconds": seconds})
            return
        console.print(cm.plan.explain(width=console.width), highlight=False, markup=False)
        for a in artifacts:
            console.print(
                f"  p{a['partition']}: {a['backend']} artifact {a['key']} at {a['path']}",
                highlight=False,
            )
        console.print(f"compiled in {seconds:.1f} s")
    finally:
        cm.shutdown()


def run_cmd(
    config: Path = config_argument(),
    cluster: str | None = cluster_option(),
    objective: Objective | None = objective_option(),
    runs: int = runs_option(),
    warmup: int = warmup_option(),
    as_json: bool = json_option(),
) -> None:
    """Compile, run the config's example inputs, compare with eager, show measured vs predicted."""

    console = make_console()
    with Activity() as activity:
        _, loaded, cm = _compiled(config, cluster, objective, activity)
        try:
            with activity.step(f"running {runs} times"), torch.no_grad():
                ref = loaded.module(*loaded.example_inputs)
                got = cm(*loaded.example_inputs)
                for _ in range(warmup):
                    cm(*loaded.example_inputs)
                times = []
                for _ in range(runs):
                    start = time.perf_counter()
                    cm(*loaded.example_inputs)
                    times.append((time.perf_counter() - start) * 1e3)
        except BaseException:
            cm.shutdown()
            raise
    try:
        diffs = [
            float((a.float() - b.float()).abs().max())
            for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(ref), strict=True)
            if isinstance(a, torch.Tensor)
        ]
        ms = spread(times)
        err = max(diffs, default=0.0)
        if as_json:
            print_json({"ms": ms, "runs": runs, "max_abs_diff": err, "plan": cm.plan.to_dict()})
            return
        console.print(
            f"{ms['p50']:.2f} ms per request (p10 {ms['p10']:.2f}, p90 {ms['p90']:.2f}, "
            f"{runs} runs); max |compiled - eager| = {err:.2e}",
            highlight=False,
        )
        console.print(cm.plan.explain(width=console.width), highlight=False, markup=False)
    finally:
        cm.shutdown()


def verify_cmd(
    config: Path = config_argument(),
    cluster: str | None = cluster_option(),
    objective: Objective | None = objective_option(),
    rtol: float = typer.Option(1e-4, help="Relative tolerance."),
    atol: float = typer.Option(1e-4, help="Absolute tolerance."),
    as_json: bool = json_option(),
) -> None:
    """Run the plan and eager side by side; on a mismatch, find the first partition and op."""

    console = make_console()
    with Activity() as activity:
        _, loaded, cm = _compiled(config, cluster, objective, activity, executor="local")
        try:
            with activity.step("running the plan and eager side by side"):
                report = verify(cm.graph, cm.stages, loaded.example_inputs, rtol=rtol, atol=atol)
        finally:
            cm.shutdown()
    if as_json:
        print_json(dataclasses.asdict(report))
    else:
        console.print(report.table(), highlight=False, markup=False)
    if not report.ok:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("compile")(compile_cmd)
    app.command("run")(run_cmd)
    app.command("verify")(verify_cmd)
