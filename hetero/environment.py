"""The process settings hetero runs its work under, in one place: thread behaviour that
decides how fast the CPU backends run, and the warnings a user cannot act on.

The CLI applies both to itself before torch loads (`apply`); the processes hetero starts
(compile workers, Ray device workers) get them through `child_env()` or
`filter_known_warnings()`. A variable the user has set is never overridden.

Idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE), though that costs a process
alone on its cores: measured on the 2-core box with the demo model (ms per forward, TVM /
eager), one process: OpenMP's default spinning 2.1 / 2.2, sleeping 3.9 / 5.7; but two
processes at once on the same cores: spinning 8.4 / 9.5 each, sleeping 3.1 / 4.0, and a
process that calls torch from several threads (a server) has one spinning team per thread.
"""

from __future__ import annotations

import os
import re
import warnings

# TVM_BIND_THREADS=0: TVM's thread pool pins the thread that sizes it (and each worker) to
# one core; torch's OpenMP workers, created later by that thread, inherit the one-core mask
# and share it (with spinning OpenMP one TVM partition took 200-336 ms instead of 2-3; the
# backend also puts the caller's mask back, backends/tvm/backend.py). OMP_WAIT_POLICY: above.
BIND_THREADS = "TVM_BIND_THREADS"
THREAD_ENV: dict[str, str] = {BIND_THREADS: "0", "OMP_WAIT_POLICY": "PASSIVE"}
# Every variable that changes how fast CPU work runs (OpenMP and TVM read them once): what a
# run reports beside its times and what a measured choice is valid for.
THREAD_VARIABLES = (*THREAD_ENV, "GOMP_SPINCOUNT", "OMP_NUM_THREADS", "TVM_NUM_THREADS")

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
