"""`hetero deploy CONFIG`: plan, compile, start the runtime, serve gRPC (a Ray actor on Ray)."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console

from hetero.cluster.connect import init_ray
from hetero.interfaces import deploy as deploy_mod
from hetero.interfaces.commands.serve import HOST_HELP, PORT_HELP
from hetero.interfaces.config import load_config
from hetero.interfaces.serving import ActorServable, ModelServable, ServerOptions
from hetero.interfaces.serving.foreground import serve_foreground


def register(app: typer.Typer) -> None:
    @app.command()
    def deploy(
        config: Path = typer.Argument(..., help="A deploy config (see configs/deploy/)."),
        host: str | None = typer.Option(None, "--host", help=HOST_HELP),
        port: int | None = typer.Option(None, "--port", help=PORT_HELP),
        name: str | None = typer.Option(None, help="Ray actor name (Ray clusters only)."),
    ) -> None:
        """Plan and compile CONFIG's model (with progress), start it, and serve it over gRPC.

        On a Ray cluster (cluster: auto or ray://...) the model runs in a deployment actor,
        reachable from other Ray programs by name, and this process serves its endpoint.
        Runs in the foreground; SIGINT/SIGTERM drain in-flight requests and exit.
        """

        console = Console(stderr=True)
        cfg = load_config(config)
        label = name or cfg.deployment_name
        with console.status(f"deploying {label}") as status:
            if cfg.is_ray:
                import ray  # optional (hetero[ray]): loaded on first use

                status.update(f"connecting to the Ray cluster at {cfg.cluster}")
                init_ray(cfg.cluster, namespace=cfg.ray.namespace)
                status.update(f"compiling {cfg.model} in the deployment actor {label!r}")
                handle = deploy_mod.deploy(cfg, name=label)
                ray.get(handle.ready.remote())
                servable = ActorServable(handle)
                summary = servable.info().get("plan_summary", "")
            else:
                cm = deploy_mod.build_compiled(cfg, progress=status.update)
                status.update("starting the runtime")
                servable = ModelServable(cm, name=label)
                summary = cm.plan.explain()
        console.print(summary, highlight=False)
        serve_foreground(servable, ServerOptions.from_config(cfg.serving, host, port), console)
