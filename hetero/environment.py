"""The process settings hetero runs its work under, in one place: thread behaviour that
decides how fast the CPU backends run, and the warnings a user cannot act on.

The CLI applies both to itself before torch loads (`apply`); the processes hetero starts
(compile workers, Ray device workers) get them through `child_env()` or
`filter_known_warnings()`. A variable the user has set is never overridden.
"""

from __future__ import annotations

import os
import re
import warnings

# OpenMP threads that spin after a BLAS call starve TVM's thread pool on the same cores
# (one partition ran 328 ms instead of 3.9); OpenMP reads this when torch loads.
THREAD_ENV: dict[str, str] = {"OMP_WAIT_POLICY": "PASSIVE"}

# (message prefix, category): torch's pytree shim warns whenever a treespec is built or
# unpickled (every capture, every process that receives a compiled partition). Prefixes
# without commas or colons: PYTHONWARNINGS splits on both.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (("`isinstance(treespec", FutureWarning),)


def filter_known_warnings() -> None:
    """Hide KNOWN_WARNINGS in this process (a pool initializer for hetero's workers)."""
    for prefix, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """THREAD_ENV and the warning filters as environment variables for a child process,
    merged under what `env` (default: this process's environment) already sets."""
    base = dict(os.environ if env is None else env)
    out = {k: base.get(k, v) for k, v in THREAD_ENV.items()}
    filters = [f"ignore:{prefix}:{category.__name__}" for prefix, category in KNOWN_WARNINGS]
    mine = [f for f in base.get("PYTHONWARNINGS", "").split(",") if f]
    out["PYTHONWARNINGS"] = ",".join([*(f for f in filters if f not in mine), *mine])
    return out


def apply() -> None:
    """Make this process and every child it starts run under hetero's settings (the CLI
    calls it first thing, before torch and OpenMP load)."""
    os.environ.update(child_env())
    filter_known_warnings()
