"""`hetero deploy CONFIG`: plan, compile, start the runtime, serve gRPC (a Ray actor on Ray)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetero.cluster.connect import init_ray
from hetero.errors import ConfigError
from hetero.interfaces import deploy as deploy_mod
from hetero.interfaces.commands.options import (
    cluster_option,
    config_argument,
    load,
    objective_option,
)
from hetero.interfaces.commands.serve import HOST_HELP, HTTP_PORT_HELP, PORT_HELP
from hetero.interfaces.serving import ActorServable, ServerOptions
from hetero.interfaces.serving.foreground import serve_foreground
from hetero.interfaces.serving.generation import servable_for
from hetero.interfaces.terminal import make_console
from hetero.partitioner.decisions import Objective, Task


def register(app: typer.Typer) -> None:
    @app.command()
    def deploy(
        config: Path = config_argument(),
        cluster: str | None = cluster_option(),
        objective: Objective | None = objective_option(),
        host: str | None = typer.Option(None, "--host", help=HOST_HELP),
        port: int | None = typer.Option(None, "--port", help=PORT_HELP),
        http_port: int | None = typer.Option(None, "--http-port", help=HTTP_PORT_HELP),
        name: str | None = typer.Option(None, help="Ray actor name (Ray clusters only)."),
    ) -> None:
        """Plan and compile CONFIG's model (with progress), start it, and serve it over gRPC.

        On a Ray cluster (cluster: auto or ray://...) the model runs in a deployment actor,
        reachable from other Ray programs by name, and this process serves its endpoint.
        gRPC carries hetero.v1 and the Open Inference Protocol; HTTP its REST twin and
        /metrics. Runs in the foreground; SIGINT/SIGTERM drain in-flight requests and exit.
        """

        console = make_console(stderr=True)
        cfg = load(config, cluster, objective)
        label = name or cfg.deployment_name
        with console.status(f"deploying {label}") as status:
            if cfg.is_ray and cfg.task is Task.GENERATE:
                raise ConfigError(
                    f"{cfg.where('task')}: a generator is not deployed as a named Ray actor yet; "
                    "use `cluster:` a file or local (executor: ray still places its devices' "
                    "workers on Ray)"
                )
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
                servable = servable_for(cm, label)
                summary = cm.plan.explain()
        console.print(summary, highlight=False)
        options = ServerOptions.from_config(
            cfg.serving, host, port, http_port, cfg.generation and cfg.generation.max_new_tokens
        )
        serve_foreground(servable, options, console)
