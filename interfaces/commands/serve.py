"""`hetero serve CONFIG`: serve a deploy config over gRPC in the foreground."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from hetero.cluster.connect import init_ray
from hetero.interfaces import deploy as deploy_mod
from hetero.interfaces.commands.options import (
    cluster_option,
    config_argument,
    load,
    objective_option,
)
from hetero.interfaces.serving import LoadingServable, ServerOptions
from hetero.interfaces.serving.foreground import serve_foreground
from hetero.interfaces.serving.generation import servable_for
from hetero.interfaces.terminal import make_console
from hetero.partitioner.decisions import Objective, Task

HOST_HELP = "Address to listen on (default: the config's serving.host, 127.0.0.1)."
PORT_HELP = "gRPC port (default: the config's serving.port; 0 picks a free one)."
HTTP_PORT_HELP = (
    "HTTP port: the Open Inference Protocol's REST twin and /metrics (default: the config's "
    "serving.http_port; 0 picks a free one)."
)


def register(app: typer.Typer) -> None:
    @app.command()
    def serve(
        config: Path = config_argument(),
        cluster: str | None = cluster_option(),
        objective: Objective | None = objective_option(),
        host: str | None = typer.Option(None, "--host", help=HOST_HELP),
        port: int | None = typer.Option(None, "--port", help=PORT_HELP),
        http_port: int | None = typer.Option(None, "--http-port", help=HTTP_PORT_HELP),
    ) -> None:
        """Serve CONFIG's model over gRPC now; compile in a child process meanwhile.

        gRPC carries hetero.v1 and the Open Inference Protocol, HTTP its REST twin and
        /metrics. The endpoint is live at once; grpc.health.v1 says NOT_SERVING until every
        partition answers, then SERVING (and NOT_SERVING again while a fault is being
        repaired). SIGINT/SIGTERM drain in-flight requests and exit.
        """
        console = make_console(stderr=True)
        cfg = load(config, cluster, objective)
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

        generative = cfg.task is Task.GENERATE

        def build() -> Any:
            plan = None
            if not generative:  # a generator's two phases are planned where they compile
                say(f"compiling {cfg.model} for {cluster.name} in a child process")
                plan = deploy_mod.prebuild(cfg, cluster)
            cm = deploy_mod.build_compiled(cfg, progress=say, cluster=cluster, plan=plan)
            console.print(f"[green]{name} is ready[/]\n{cm.plan.explain()}", highlight=False)
            return servable_for(cm, name)

        servable = LoadingServable(build, name=name, generative=generative)
        options = ServerOptions.from_config(
            cfg.serving, host, port, http_port, cfg.generation and cfg.generation.max_new_tokens
        )
        serve_foreground(servable, options, console)
        if servable.error:
            console.print(f"[red]{name} never became ready:[/] {servable.error}", highlight=False)
            raise typer.Exit(1)
