"""The `hetero` console script. Each module in hetero.interfaces.commands adds its commands
through `register(app)`, so every command lives beside the code it drives."""

from __future__ import annotations

import importlib
import pkgutil
import sys
import warnings

import typer
from rich.console import Console

from hetero.errors import HeteroError

app = typer.Typer(
    name="hetero",
    help="Compile one PyTorch model for a cluster of GPUs, CPUs and NPUs, and run it.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Compile one PyTorch model for a cluster of GPUs, CPUs and NPUs, and run it."""


def _register_commands() -> None:
    import hetero.interfaces.commands as pkg

    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{pkg.__name__}.{info.name}")
        module.register(app)


_register_commands()


def main() -> None:
    # torch.export's pytree shims warn on every capture; nothing a user can act on.
    warnings.filterwarnings("ignore", category=FutureWarning)
    try:
        app()
    except HeteroError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
