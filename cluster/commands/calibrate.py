"""`hetero calibrate`: measure this machine's devices and write a cost-model profile."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table


def calibrate(
    cluster: str = typer.Option("local", "--cluster", help="cluster YAML or 'local'"),
    out: Path | None = typer.Option(
        None, "--out", help="profile JSON (default: the cache dir, where plans find it)"
    ),
    quick: bool = typer.Option(False, "--quick", help="fewer, smaller microbenchmarks"),
) -> None:
    """Microbenchmark the devices present, fit efficiency factors, write the profile."""
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.calibrate import calibrate as run
    from hetero.partitioner.calibrate import fit_errors
    from hetero.partitioner.cost import default_profile_path

    console = Console()
    spec = ClusterSpec.local() if cluster == "local" else ClusterSpec.from_yaml(cluster)
    with console.status("measuring") as status:
        profile, skipped, _ = run(spec, quick=quick, log=lambda s: status.update(s))
    for s in skipped:
        console.print(f"skipped {s.device}: {s.reason}", highlight=False)
    t = Table(title=f"calibration of {spec.name}", title_justify="left")
    cols = ("device", "op class", "e_compute", "e_memory", "op overhead", "fit error", "samples")
    for col in cols:
        t.add_column(col, justify="left" if col in ("device", "op class") else "right")
    for dev, cls, ec, em, ov, err, n in fit_errors(profile):
        t.add_row(
            dev, cls, f"{ec:.3f}", f"{em:.3f}", f"{ov * 1e6:.1f} us", f"{100 * err:.1f}%", str(n)
        )
    console.print(t)
    for dp in profile.devices:
        console.print(
            f"{dp.device}: op overhead {1e6 * (dp.launch_overhead or 0):.1f} us, "
            f"view {1e6 * (dp.view_overhead or 0):.1f} us",
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
