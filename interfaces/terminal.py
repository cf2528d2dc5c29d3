"""How the CLI talks to a person: how loud it is (`-v`/`-q` set the `hetero` logger's level,
which everything here reads), consoles that keep tables whole when the output is a pipe or
a file, one live display per command (a spinner per step, a bar for counted work), and
JSON on stdout when asked."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

LOGGER = "hetero"
# Rich lays out a console that is no terminal at 80 columns, which squeezes the plan's
# tables into wrapped cells; a pipe or a file gets this many (or $COLUMNS) instead.
PIPE_WIDTH = 200

# (what, done, total; 0: not known): the callback long work reports its progress through
Report = Callable[[str, int, int], None]


def set_verbosity(verbose: int = 0, quiet: bool = False) -> int:
    """`-q`: errors only; default: warnings; `-v`: what hetero does; `-vv`: debugging.
    Sets the `hetero` logger's level (Ray's follows it: cluster/connect.py) and sends its
    records to stderr as `warning: ...`. The level."""
    if quiet:
        level = logging.ERROR
    else:
        level = {0: logging.WARNING, 1: logging.INFO}.get(verbose, logging.DEBUG)
    logger = logging.getLogger(LOGGER)
    logger.setLevel(level)
    if not any(isinstance(h, _Stderr) for h in logger.handlers):
        logger.addHandler(_Stderr())
    return level


def is_quiet() -> bool:
    return logging.getLogger(LOGGER).getEffectiveLevel() >= logging.ERROR


class _Stderr(logging.Handler):
    """Writes to whatever sys.stderr is when a record comes (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            verbose = logging.getLogger(LOGGER).getEffectiveLevel() < logging.WARNING
            where = f" {record.name}" if verbose else ""
            sys.stderr.write(f"{record.levelname.lower()}{where}: {record.getMessage()}\n")
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


def make_console(stderr: bool = False) -> Console:
    """A console for tables and messages: the terminal's width on a terminal, PIPE_WIDTH
    (or $COLUMNS) columns otherwise, so piped tables keep their cells on one line."""
    stream = sys.stderr if stderr else sys.stdout
    tty = getattr(stream, "isatty", lambda: False)()
    width = None if tty else int(os.environ.get("COLUMNS") or 0) or PIPE_WIDTH
    return Console(stderr=stderr, width=width, soft_wrap=not tty)


def print_json(data: Any) -> None:
    """`data` as indented JSON on stdout (what `--json` prints instead of tables)."""
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


class Activity:
    """One live display on stderr for a command's long work: `step("planning")` shows a
    spinner while its block runs; `counter()` gives a Report whose work shows as a bar per
    label ("compiling partitions 3/7"). Nothing shows with `-q`, or when stderr is no
    terminal (CI logs get the results, not the redraws)."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or make_console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
            disable=is_quiet() or not self.console.is_terminal,
        )
        self._tasks: dict[str, Any] = {}

    def __enter__(self) -> Activity:
        self.progress.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.__exit__(*exc)

    @contextlib.contextmanager
    def step(self, what: str) -> Iterator[Callable[[str], None]]:
        """A spinner labelled `what` while the block runs; yields a function that relabels it."""
        task = self.progress.add_task(what, total=None)
        try:
            yield lambda text: self.progress.update(task, description=text)
        finally:
            self.progress.remove_task(task)

    def counter(self) -> Report:
        """A Report: a bar per label at (done, total); total 0: a count with no end known."""

        def report(what: str, done: int, total: int) -> None:
            task = self._tasks.get(what)
            if task is None:
                task = self._tasks[what] = self.progress.add_task(what, total=total or None)
            self.progress.update(task, completed=done, total=total or None)

        return report
