"""`hetero serve CONFIG`: serve a deploy config over gRPC in the foreground."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.cluster.connect import init_ray
from hetero.interfaces import deploy as deploy_mod
from hetero.interfaces.config import load_config
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
        """Serve CONFIG's model over gRPC now; compile in a child process meanwhile.

        The endpoint is live at once; grpc.health.v1 says NOT_SERVING until every
        partition answers, then SERVING (and NOT_SERVING again while a fault is being
        repaired). SIGINT/SIGTERM drain in-flight requests and exit.
        """
        console = Console(stderr=True)
        cfg = load_config(config)
        name = cfg.deployment_name
        say = lambda m: console.print(f"[dim]{m}[/]", highlight=False)  # noqa: E731
        if cfg.is_ray:
            init_ray(cfg.cluster, namespace=cfg.ray.namespace)
        cluster = cfg.cluster_spec()
        if deploy_mod.needs_ray(cfg):
            # Here, in the main thread: Ray's head processes die with the thread that
            # started them, and the build below runs in a thread that ends.
            deploy_mod.ensure_ray(cluster, host=cfg.ray.head_host)
        deploy_mod.preload_backends(cfg)

        def build() -> ModelServable:
            say(f"compiling {cfg.model} for {cluster.name} in a child process")
            plan = deploy_mod.prebuild(cfg, cluster)
            cm = deploy_mod.build_compiled(cfg, progress=say, cluster=cluster, plan=plan)
            console.print(f"[green]{name} is ready[/]\n{cm.plan.explain()}", highlight=False)
            return ModelServable(cm, name=name)

        servable = LoadingServable(build, name=name)
        serve_foreground(servable, ServerOptions.from_config(cfg.serving, host, port), console)
        if servable.error:
            console.print(f"[red]{name} never became ready:[/] {servable.error}", highlight=False)
            raise typer.Exit(1)
