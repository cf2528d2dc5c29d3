"""`hetero status` / `hetero stop NAME`: deployments started by `hetero submit` or hetero.deploy."""

from __future__ import annotations

import os

import typer
from rich.console import Console
from rich.table import Table

from hetero.cluster.connect import init_ray
from hetero.interfaces.deploy import list_deployments
from hetero.interfaces.deploy import stop as stop_deployment
from hetero.interfaces.jobs import list_jobs, stop_via_jobs

ADDRESS_HELP = (
    "http://HEAD:8265 (the job API: lists hetero's jobs) or a Ray address (auto, "
    "ray://HEAD:10001, HEAD:6379: lists the deployment actors). Default: $RAY_ADDRESS or auto."
)


def _address(address: str | None) -> str:
    return address or os.environ.get("RAY_ADDRESS") or "auto"


def register(app: typer.Typer) -> None:
    @app.command()
    def status(
        name: str | None = typer.Argument(None, help="One deployment (default: all)."),
        address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
        namespace: str = typer.Option("hetero", help="Ray namespace of the deployments."),
    ) -> None:
        """Show hetero's deployments on a Ray cluster (or its submitted jobs)."""

        console = Console()
        addr = _address(address)
        if addr.startswith(("http://", "https://")):
            table = Table(title=f"hetero jobs at {addr}")
            for col in ("job", "deployment", "status", "message"):
                table.add_column(col)
            for row in list_jobs(addr, name):
                table.add_row(row["job"], row["deployment"], row["status"], row["message"][:60])
            console.print(table)
            return

        init_ray(addr, namespace=namespace)
        rows = [r for r in list_deployments(namespace) if name is None or r["name"] == name]
        table = Table(title=f"hetero deployments (namespace {namespace})")
        for col in ("name", "ready", "model", "partitions", "gRPC", "note"):
            table.add_column(col)
        for r in rows:
            table.add_row(
                r["name"],
                "yes" if r.get("ready") else "no",
                str(r.get("model", "")),
                str(len(r.get("partitions", []))),
                r.get("grpc", ""),
                r.get("error", ""),
            )
        console.print(table)
        if name is not None and not rows:
            raise typer.Exit(1)

    @app.command()
    def stop(
        name: str = typer.Argument(..., help="The deployment to end."),
        address: str | None = typer.Option(None, "--address", help=ADDRESS_HELP),
        namespace: str = typer.Option("hetero", help="Ray namespace of the deployment."),
    ) -> None:
        """Drain and end a deployment (and stop its job, when it was submitted)."""

        console = Console(stderr=True)
        addr = _address(address)
        if addr.startswith(("http://", "https://")):
            result = stop_via_jobs(addr, name)
            console.print(f"stop {name}: {result}", highlight=False)
            if result != "SUCCEEDED":
                raise typer.Exit(1)
            return

        init_ray(addr, namespace=namespace)
        stop_deployment(name, namespace)
        console.print(f"stopped {name}", highlight=False)
