"""`hetero calibrate`: measure this machine's devices and write a cost-model profile; or,
with --from-runs, fold what a deployment measured into the profile."""

from __future__ import annotations

import os
import statistics
from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetero.backends.registry import default_registry
from hetero.calibration import calibrate as run
from hetero.calibration import fit_errors
from hetero.calibration.feedback import error_table, fold
from hetero.cluster.connect import init_ray
from hetero.cluster.profile import CalibrationProfile, default_profile_path
from hetero.cluster.reference import resolve_cluster
from hetero.cluster.runs import RunLog
from hetero.interfaces.commands.options import cluster_option, json_option, load, out_option
from hetero.interfaces.deploy import find
from hetero.interfaces.terminal import Activity, make_console, print_json
from hetero.partitioner.decisions import BackendAssignment


def calibrate(
    cluster: str | None = cluster_option(),
    config: Path | None = typer.Option(
        None,
        "--config",
        help="a deploy config: calibrate its cluster through the backends it maps each "
        "device kind to (e.g. configs/demo.yaml: tvm for cpu and npu)",
    ),
    backend: list[str] = typer.Option(
        [],
        "--backend",
        help="measure every device through this backend (repeatable; default: the config's "
        "backends, else eager)",
    ),
    emulated: bool = typer.Option(
        False,
        "--emulated/--no-emulated",
        help="also measure emulated devices (they run on this host: their factors then price "
        "the emulation)",
    ),
    out: Path | None = out_option("the profile JSON (default: the cache dir, where plans find it)"),
    quick: bool = typer.Option(False, "--quick", help="fewer, smaller microbenchmarks"),
    dtype: list[str] = typer.Option(
        [],
        "--dtype",
        help="measure op classes in this dtype (repeatable; default float32; give the dtypes "
        "your models run in: eager backends measure each, compiling ones the first)",
    ),
    from_runs: list[str] = typer.Option(
        [],
        "--from-runs",
        help="fold measured runs into the profile instead of microbenchmarking: a run log "
        "(JSON from CompiledModel.run_log().to_json(path)) or the name of a running "
        "deployment (hetero.deploy / hetero submit); repeatable",
    ),
    profile_in: Path | None = typer.Option(
        None,
        "--profile",
        help="with --from-runs: the profile to fold into (default: the cluster's cached one)",
    ),
    address: str | None = typer.Option(
        None,
        "--address",
        help="with --from-runs NAME: the Ray cluster (default: $RAY_ADDRESS or auto)",
    ),
    as_json: bool = json_option(),
) -> None:
    """Microbenchmark the devices present through their backends, fit efficiency factors,
    write the profile (one entry per device and backend); or fold measured runs into it
    (--from-runs).

    --from-runs corrects the profile by what running deployments measured: per device,
    backend, op class and shape bucket, and the executor's per-stage and per-hop costs."""

    console = make_console()
    if from_runs:
        _from_runs(console, from_runs, profile_in, out, address)
        return

    known = default_registry().names()
    backends: list[BackendAssignment] = []
    if config is not None:
        cfg = load(config, cluster)
        spec = cfg.cluster_spec()
        backends = [BackendAssignment.parse(cfg.backend_assignment, known=known)]
    else:
        spec = resolve_cluster(cluster or "local", where="--cluster")
    if backend:
        backends = [
            BackendAssignment.parse(BackendAssignment.everywhere(b), known=known, where="--backend")
            for b in backend
        ]
    with Activity() as activity, activity.step("measuring") as say:
        profile, skipped, _ = run(
            spec,
            backends=backends,
            quick=quick,
            emulated=emulated,
            dtypes=tuple(dtype) or ("float32",),
            log=say,
            progress=activity.counter(),
        )
    path = out or default_profile_path(spec.name)
    profile.to_json(path)
    if as_json:
        print_json(
            {
                "profile": str(path),
                "skipped": [{"device": s.device, "reason": s.reason} for s in skipped],
                "fit": [
                    {"device": dev, "backend": bk, "op_class": cls, "e_compute": ec,
                     "e_memory": em, "op_overhead_s": ov, "fit_error": err, "samples": n}
                    for dev, bk, cls, ec, em, ov, err, n in fit_errors(profile)
                ],
            }
        )  # fmt: skip
        return
    for s in skipped:
        console.print(f"skipped {s.device}: {s.reason}", highlight=False)
    t = Table(title=f"calibration of {spec.name}", title_justify="left")
    cols = (
        "device",
        "backend",
        "op class",
        "e_compute",
        "e_memory",
        "op overhead",
        "fit error",
        "samples",
    )
    for col in cols:
        t.add_column(col, justify="left" if col in cols[:3] else "right")
    for dev, bk, cls, ec, em, ov, err, n in fit_errors(profile):
        t.add_row(
            dev,
            bk,
            cls,
            f"{ec:.3f}",
            f"{em:.3f}",
            f"{ov * 1e6:.1f} us",
            f"{100 * err:.1f}%",
            str(n),
        )
    console.print(t)
    for dp in profile.devices:
        console.print(
            f"{dp.device} ({dp.backend}, {dp.threads or '?'} threads): "
            f"op overhead {1e6 * (dp.launch_overhead or 0):.1f} us "
            f"(+{1e6 * dp.runner_overhead:.1f} us through the runner), "
            f"view {1e6 * (dp.view_overhead or 0):.1f} us, "
            f"partition call {1e6 * (dp.call_overhead or 0):.1f} us, "
            f"sequence factor {dp.sequence_factor:.2f}",
            highlight=False,
        )
    for lp in profile.links:
        console.print(
            f"link {lp.a}<->{lp.b}: {lp.bandwidth / 1e9:.1f} GB/s, {1e6 * lp.latency:.1f} us",
            highlight=False,
        )
    console.print(f"wrote {path}", highlight=False)


def _read_log(source: str, address: str | None) -> RunLog:
    if Path(source).exists():
        return RunLog.load(source)
    # not a file: the name of a running deployment, whose actor answers
    init_ray(address or os.environ.get("RAY_ADDRESS") or "auto")
    import ray  # optional (hetero[ray]): loaded on first use

    return RunLog.from_dict(ray.get(find(source).run_log.remote(), timeout=60), source=source)


def _from_runs(
    console: Console, sources: list[str], profile_in: Path | None, out: Path | None, address
) -> None:
    logs = [_read_log(s, address) for s in sources]
    log = RunLog.merge(logs[0].cluster, logs)
    path = profile_in or default_profile_path(log.cluster)
    base = CalibrationProfile.load(path) if Path(path).exists() else None
    if base is None:
        console.print(
            f"no profile at {path}: folding into the cost model's defaults "
            "(run `hetero calibrate` on the cluster first for better ones)",
            highlight=False,
        )
    before = base or CalibrationProfile(cluster=log.cluster)
    profile = fold(base, log)
    t = Table(
        title=f"feedback from {len(log.partitions)} partition record(s)", title_justify="left"
    )
    for col in ("device", "backend", "key", "factor", "runs", "fit error"):
        t.add_column(col, justify="left" if col in ("device", "backend", "key") else "right")
    for c in profile.corrections:
        t.add_row(
            c.device, c.backend, c.key, f"{c.factor:.3f}", str(c.samples), f"{100 * c.error:.1f}%"
        )
    console.print(t)
    for r in profile.runtime:
        console.print(
            f"executor {r.executor}: {1e6 * r.stage_overhead:.1f} us per stage, "
            f"{1e6 * r.hop_overhead:.1f} us per hop between devices ({r.samples} runs)",
            highlight=False,
        )
    errors = {}
    for name, prof in (("before", before), ("after", profile)):
        errors[name] = [abs(p - m) / m for _, m, p in error_table(log, prof) if m > 0]
    if errors["after"]:
        console.print(
            f"median per-partition error over these runs: "
            f"{100 * statistics.median(errors['before']):.1f}% before, "
            f"{100 * statistics.median(errors['after']):.1f}% after",
            highlight=False,
        )
    dest = out or default_profile_path(log.cluster)
    profile.to_json(dest)
    console.print(f"wrote {dest}")


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
