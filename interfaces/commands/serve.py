"""`hetero serve CONFIG`: serve a deploy config over gRPC in the foreground."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.interfaces.config import load_config
from hetero.interfaces.deploy import build_compiled
from hetero.interfaces.serving import LoadingServable, ModelServable, ServerOptions
from hetero.interfaces.serving.foreground import serve_foreground

HOST_HELP = "Address to listen on (default: the config's serving.host, 127.0.0.1)."
PORT_HELP = "Port to listen on (default: the config's serving.port; 0 picks a free one)."


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path = typer.Argument(..., help="A deploy config (see configs/deploy/)."),
        host: str | None = typer.Option(None, "--host", help=HOST_HELP),
        port: int | None = typer.Option(None, "--port", help=PORT_HELP),
    ) -> None:
        """Serve CONFIG's model over gRPC now; compile in the background.

        The endpoint is live at once; grpc.health.v1 says NOT_SERVING until every
        partition answers, then SERVING. SIGINT/SIGTERM drain in-flight requests and exit.
        """

        console = Console(stderr=True)
        cfg = load_config(config)
        name = cfg.deployment_name

        def build() -> ModelServable:
            cm = build_compiled(cfg, progress=lambda m: console.print(f"[dim]{m}[/]"))
            console.print(f"[green]{name} is ready[/]\n{cm.plan.explain()}", highlight=False)
            return ModelServable(cm, name=name)

        servable = LoadingServable(build, name=name)
        serve_foreground(servable, ServerOptions.from_config(cfg.serving, host, port), console)
        if servable.error:
            console.print(f"[red]{name} never became ready:[/] {servable.error}", highlight=False)
            raise typer.Exit(1)
