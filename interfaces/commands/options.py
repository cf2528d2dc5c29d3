"""The options commands share, spelt and defaulted once: a deploy config argument,
`--cluster` and `--objective` (override the config's), `--runs`/`--warmup`, `--json`
(JSON on stdout instead of tables) and `--out/-o` (write a file)."""

from __future__ import annotations

from pathlib import Path

import typer

from hetero.cluster.reference import FILE, reference_kind
from hetero.errors import ConfigError
from hetero.interfaces.config import DeployConfig, load_config
from hetero.partitioner.decisions import Objective

RUNS = 20  # timed runs: bench, run and demo
WARMUP = 3  # untimed runs before them


def config_argument() -> typer.models.ArgumentInfo:
    return typer.Argument(..., help="A deploy config (YAML; see configs/deploy/).")


def cluster_option() -> typer.models.OptionInfo:
    return typer.Option(
        None,
        "--cluster",
        help="Cluster YAML, 'local', or a Ray address (default: the config's cluster).",
    )


def objective_option() -> typer.models.OptionInfo:
    return typer.Option(
        None, "--objective", help="What to minimise (default: the config's, else latency)."
    )


def runs_option() -> typer.models.OptionInfo:
    return typer.Option(RUNS, "--runs", min=1, help="Timed runs.")


def warmup_option() -> typer.models.OptionInfo:
    return typer.Option(WARMUP, "--warmup", min=0, help="Untimed runs first.")


def json_option() -> typer.models.OptionInfo:
    return typer.Option(False, "--json", help="Print JSON on stdout instead of tables.")


def out_option(what: str) -> typer.models.OptionInfo:
    return typer.Option(None, "--out", "-o", help=f"Write {what} here.")


def load(
    config: Path, cluster: str | None = None, objective: Objective | None = None
) -> DeployConfig:
    """The config at `config` with `--cluster` / `--objective` in place of its own (a
    cluster file given on the command line is relative to the working directory)."""
    cfg = load_config(config)
    update: dict = {}
    if cluster is not None:
        try:
            kind = reference_kind(cluster)
        except ValueError as e:
            raise ConfigError(f"--cluster: {e}") from None
        if kind == FILE:
            path = Path(cluster).expanduser().resolve()
            if not path.is_file():
                raise ConfigError(f"--cluster: no cluster file {cluster} (looked for {path})")
            cluster = str(path)
        update["cluster"] = cluster
    if objective is not None:
        update["objective"] = Objective.parse(objective)
    return cfg.model_copy(update=update) if update else cfg
