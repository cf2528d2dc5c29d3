"""`hetero submit CONFIG --address http://HEAD:8265`: compile and deploy as a Ray job."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.interfaces.jobs import submit as submit_job

ADDRESS_HELP = (
    "The Ray job API (dashboard) address, e.g. http://HEAD:8265. It has no authentication "
    "(CVE-2023-48022): use it only on a trusted network."
)


def register(app: typer.Typer) -> None:
    @app.command()
    def submit(
        config: Path = typer.Argument(..., help="A deploy config (see configs/deploy/)."),
        address: str = typer.Option(
            ..., "--address", envvar="RAY_API_SERVER_ADDRESS", help=ADDRESS_HELP
        ),
        name: str | None = typer.Option(None, help="Deployment name (default: config's name)."),
        follow: bool = typer.Option(True, help="Follow the job's logs until it ends."),
        timeout: float | None = typer.Option(None, help="Give up following after this many s."),
    ) -> None:
        """Submit CONFIG as a Ray job: compile on the cluster, start a named deployment.

        Follows the job's logs and exits with its status (0 when it SUCCEEDED). The
        deployment outlives the job; `hetero status` shows it, `hetero stop NAME` ends it.
        """

        console = Console(stderr=True)
        job_id, status = submit_job(config, address, name=name, follow=follow, timeout=timeout)
        console.print(f"job {job_id}: {status}", highlight=False)
        if follow and status != "SUCCEEDED":
            raise typer.Exit(1)
