"""The `hetero` console script. Each module in hetero.interfaces.commands adds its commands
through `register(app)`, so every command lives beside the code it drives; a module is
imported only when one of its commands runs, so `hetero --help` answers at once (and
`--version` too: neither loads torch).

Before any command runs, `main` sets the thread behaviour hetero is measured with
(TVM_BIND_THREADS=0, OMP_WAIT_POLICY=PASSIVE and GOMP_SPINCOUNT=0, or 300000 with
HETERO_OWN_CORES=1; unless set) and the filters for warnings nobody can act on, for this
process and every one it starts (hetero/environment.py);
`-v`/`-q` set how much hetero (and Ray) log."""

from __future__ import annotations

import importlib
import sys
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from hetero import environment
from hetero.errors import HeteroError
from hetero.interfaces.terminal import make_console, set_verbosity

# command -> (its module in hetero.interfaces.commands, the line `hetero --help` shows:
# the first line of the command's docstring; tests/interfaces/test_cli.py checks they agree)
COMMANDS: dict[str, tuple[str, str]] = {
    "bench": (
        "bench",
        "Time CONFIG's model eagerly and compiled by hetero; predicted vs measured per partition.",
    ),
    "calibrate": (
        "calibrate",
        "Microbenchmark the devices present through their backends, fit efficiency factors, "
        "write the profile (one entry per device and backend); or fold measured runs into "
        "it (--from-runs).",
    ),
    "compile": (
        "compile",
        "Plan and compile every partition into the artifact cache; print the plan.",
    ),
    "run": (
        "compile",
        "Compile, run the config's example inputs, compare with eager, show measured vs predicted.",
    ),
    "verify": (
        "compile",
        "Run the plan and eager side by side; on a mismatch, find the first partition and op.",
    ),
    "demo": ("demo", "Capture, plan, compile and run the demo model; compare with eager."),
    "deploy": (
        "deploy",
        "Plan and compile CONFIG's model (with progress), start it, and serve it over gRPC.",
    ),
    "plan": (
        "plan",
        "Partition a model over a cluster; print the explain table, write plan.json and a picture.",
    ),
    "serve": ("serve", "Serve CONFIG's model over gRPC now; compile in a child process meanwhile."),
    "status": ("status", "Show hetero's deployments on a Ray cluster (or its submitted jobs)."),
    "stop": ("status", "Drain and end a deployment (and stop its job, when it was submitted)."),
    "submit": (
        "submit",
        "Submit CONFIG as a Ray job: compile on the cluster, start a named deployment.",
    ),
}


def load_command(name: str) -> Any:
    """The (typer's click) command `name`, from its module's `register(app)`."""
    module, _ = COMMANDS[name]
    sub = typer.Typer()
    importlib.import_module(f"hetero.interfaces.commands.{module}").register(sub)
    built = typer.main.get_command(sub)  # one command, or a group of the module's commands
    cmd = built.commands.get(name) if isinstance(built, TyperGroup) else built
    if cmd is None:
        raise KeyError(f"hetero.interfaces.commands.{module} registers no command {name!r}")
    return cmd


class _Lazy(TyperCommand):
    """A command that loads its module when it runs (or when its own help is asked for)."""

    def __init__(self, name: str, summary: str) -> None:
        super().__init__(name, short_help=summary, help=summary)

    def make_context(self, info_name: Any, args: list[str], parent: Any = None, **extra: Any):
        return load_command(self.name).make_context(info_name, args, parent=parent, **extra)


class _Commands(TyperGroup):
    def list_commands(self, ctx: typer.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: typer.Context, cmd_name: str) -> Any:
        if cmd_name not in COMMANDS:
            return None
        return _Lazy(cmd_name, COMMANDS[cmd_name][1])


app = typer.Typer(
    name="hetero",
    cls=_Commands,
    help="Compile one PyTorch model for a cluster of GPUs, CPUs and NPUs, and run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(show: bool) -> None:
    if show:
        try:
            typer.echo(f"hetero {version('hetero')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("hetero (not installed)")
        raise typer.Exit()


@app.callback()
def _root(
    verbose: int = typer.Option(
        0, "--verbose", "-v", count=True, help="Say what hetero does (-vv: debugging too)."
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="Errors and results only: no warnings, no progress."
    ),
    _show_version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Print the version and exit."
    ),
) -> None:
    """Compile one PyTorch model for a cluster of GPUs, CPUs and NPUs, and run it."""
    set_verbosity(verbose, quiet)


def main() -> None:
    environment.apply()  # before torch (OpenMP reads its settings once, when it loads)
    try:
        app()
    except HeteroError as e:
        make_console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
