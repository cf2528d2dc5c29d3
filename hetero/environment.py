"""The process settings hetero runs its work under, in one place: thread behaviour that
decides how fast the CPU backends run, and the warnings a user cannot act on.

The CLI applies both to itself before torch loads (`apply`); the processes hetero starts
(compile workers, Ray device workers) get them through `child_env()` or
`filter_known_warnings()`. A variable the user has set is never overridden.

How idle OpenMP threads wait (`ThreadWait`) is decided per process by who else computes
on its cores: measured on the 2-core box with the demo model (ms per forward, TVM /
eager), one process: spinning 2.1 / 2.2, sleeping (OMP_WAIT_POLICY=PASSIVE) 3.9 / 5.7;
two processes at once on the same cores: spinning 8.4 / 9.5 each, sleeping 3.1 / 4.0.
"""

from __future__ import annotations

import os
import re
import warnings
from enum import Enum

# TVM's thread pool pins the thread that sizes it (and each worker) to one core; torch's
# OpenMP workers, created later by that thread, inherit the one-core mask and then share
# it. On the 2-core box that ran eager ops at half speed, and with OpenMP's default
# spin-waiting one TVM partition took 200-336 ms instead of 2-3 (it was blamed on spinning
# for a while: OMP_WAIT_POLICY=PASSIVE hid the symptom and cost small ops 2-5x).
# Unpinned, TVM and OpenMP share the cores: the demo model ran 2.1 ms vs 3.0 pinned+passive.
THREAD_ENV: dict[str, str] = {"TVM_BIND_THREADS": "0"}


class ThreadWait(Enum):
    """How a process's idle OpenMP threads wait for the next parallel op."""

    SPIN = "spin"  # OpenMP's default: the next op starts at once; for a process alone on its cores
    PASSIVE = "passive"  # sleep at once: for processes that share their cores with others


WAIT_ENV: dict[ThreadWait, dict[str, str]] = {
    ThreadWait.SPIN: {},
    ThreadWait.PASSIVE: {"OMP_WAIT_POLICY": "PASSIVE"},
}

# (message prefix, category): torch's pytree shim warns whenever a treespec is built or
# unpickled (every capture, every process that receives a compiled partition). Prefixes
# without commas or colons: PYTHONWARNINGS splits on both.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (("`isinstance(treespec", FutureWarning),)


def filter_known_warnings() -> None:
    """Hide KNOWN_WARNINGS in this process (a pool initializer for hetero's workers)."""
    for prefix, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)


def child_env(
    env: dict[str, str] | None = None, wait: ThreadWait = ThreadWait.SPIN
) -> dict[str, str]:
    """THREAD_ENV, `wait`'s variables and the warning filters as environment variables for a
    child process, merged under what `env` (default: this process's environment) sets."""
    base = dict(os.environ if env is None else env)
    out = {k: base.get(k, v) for k, v in {**THREAD_ENV, **WAIT_ENV[wait]}.items()}
    filters = [f"ignore:{prefix}:{category.__name__}" for prefix, category in KNOWN_WARNINGS]
    mine = [f for f in base.get("PYTHONWARNINGS", "").split(",") if f]
    out["PYTHONWARNINGS"] = ",".join([*(f for f in filters if f not in mine), *mine])
    return out


def apply() -> None:
    """Make this process and every child it starts run under hetero's settings (the CLI
    calls it first thing, before torch and OpenMP load)."""
    os.environ.update(child_env())
    filter_known_warnings()
