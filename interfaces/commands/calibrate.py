"""`hetero calibrate`: measure this machine's devices and write a cost-model profile."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from hetero.backends.registry import default_registry
from hetero.calibration import calibrate as run
from hetero.calibration import fit_errors
from hetero.cluster.profile import default_profile_path
from hetero.cluster.reference import resolve_cluster
from hetero.interfaces.config import load_config
from hetero.partitioner.decisions import BackendAssignment


def calibrate(
    cluster: str = typer.Option(
        None, "--cluster", help="cluster YAML or 'local' (default: the config's, else 'local')"
    ),
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
    out: Path | None = typer.Option(
        None, "--out", help="profile JSON (default: the cache dir, where plans find it)"
    ),
    quick: bool = typer.Option(False, "--quick", help="fewer, smaller microbenchmarks"),
    dtype: list[str] = typer.Option(
        [],
        "--dtype",
        help="measure op classes in this dtype (repeatable; default float32; give the dtypes "
        "your models run in: eager backends measure each, compiling ones the first)",
    ),
) -> None:
    """Microbenchmark the devices present through their backends, fit efficiency factors,
    write the profile (one entry per device and backend)."""

    console = Console()

    known = default_registry().names()
    backends: list[BackendAssignment] = []
    if config is not None:
        cfg = load_config(config)
        spec = cfg.cluster_spec() if cluster is None else resolve_cluster(cluster)
        backends = [BackendAssignment.parse(cfg.backend_assignment, known=known)]
    else:
        spec = resolve_cluster(cluster or "local")
    if backend:
        backends = [
            BackendAssignment.parse(BackendAssignment.everywhere(b), known=known, where="--backend")
            for b in backend
        ]
    with console.status("measuring") as status:
        profile, skipped, _ = run(
            spec,
            backends=backends,
            quick=quick,
            emulated=emulated,
            dtypes=tuple(dtype) or ("float32",),
            log=lambda s: status.update(s),
        )
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
    path = out or default_profile_path(spec.name)
    profile.to_json(path)
    console.print(f"wrote {path}")


def register(app: typer.Typer) -> None:
    app.command()(calibrate)
