"""A progress bar for long planning (rich), or the caller's own callback, or nothing."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

Report = Callable[[str, float, float], None]  # (phase, seconds spent, budget in seconds)


@contextlib.contextmanager
def progress_bar(progress: bool | Report | None) -> Iterator[Report | None]:
    """True: a transient rich bar on stderr (filled by the time budget, when there is one);
    a callable: used as is; None/False: no reports."""
    if not progress:
        yield None
        return
    if callable(progress):
        yield progress
        return
    console = Console(file=sys.stderr)
    with Progress(
        TextColumn("planning: {task.description}"),
        BarColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as bar:
        task = bar.add_task("starting", total=None)

        def report(phase: str, spent: float, budget: float) -> None:
            if budget > 0:
                bar.update(task, description=phase, total=budget, completed=min(spent, budget))
            else:
                bar.update(task, description=phase)

        yield report
