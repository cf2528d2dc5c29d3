"""The process settings hetero runs its work under, in one place: thread behaviour that
decides how fast the CPU backends run, and the warnings a user cannot act on.

The CLI applies both to itself before torch loads (`apply`); the processes hetero starts
(compile workers, Ray device workers) get them through `child_env()` or
`filter_known_warnings()`. A variable the user has set is never overridden.

Idle OpenMP threads sleep at once (OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0) unless the
person says the machine's cores are theirs (HETERO_OWN_CORES=1): then a process alone on
them spins 300000 times first, OpenMP's own default count (libgomp honours GOMP_SPINCOUNT
under PASSIVE, and itself drops to no spin once a process's OpenMP threads outnumber its
cores). Measured on the 2-core box with the demo model, ms per forward
(benchmarks/thread_wait.py, 3 alternations, benchmarks/results/cpu_choice.md), sleeping
at once / that spin / a 10000 spin: a process alone 4.1 / 2.35 / 2.4 (ONNX Runtime
2.35-2.60); beside a program keeping one core busy 3.3 / 6.5 / 23.2; two processes at once
3.2 / 6.6 / 23.8 each; one process whose 4 threads take turns calling the model (a server)
3.6 / 3.9 / 4.4. Every spin measured loses 2-7x wherever another thread wants the cores,
so the spin is the person's to grant, and Ray device workers that compute on one node's
CPUs together (runtime/placement.py `sharing_cores`) sleep at once even then. (OpenMP's
default policy spins as long, and once took 198 ms per forward in a pair.)
"""

from __future__ import annotations

import os
import re
import warnings

from hetero.errors import ConfigError

# TVM_BIND_THREADS=0: TVM's thread pool pins the thread that sizes it (and each worker) to
# one core; torch's OpenMP workers, created later by that thread, inherit the one-core mask
# and share it (with spinning OpenMP one TVM partition took 200-336 ms instead of 2-3; the
# backend also puts the caller's mask back, backends/tvm/backend.py). The wait: above.
BIND_THREADS = "TVM_BIND_THREADS"
SPIN_COUNT = "GOMP_SPINCOUNT"
THREAD_ENV: dict[str, str] = {BIND_THREADS: "0", "OMP_WAIT_POLICY": "PASSIVE", SPIN_COUNT: "0"}
# OWN_CORES=1: the person says no other program computes on this machine's cores. Then a
# process of hetero's that is alone on them spins first (OWN_CORES_ENV); one that
# shares them with another of hetero's compute processes (the Ray device workers of one
# node, runtime/placement.py `sharing_cores`) still sleeps at once.
OWN_CORES = "HETERO_OWN_CORES"
OWN_CORES_ENV: dict[str, str] = {SPIN_COUNT: "300000"}
# The THREAD_ENV variables hetero filled in itself, so that a child can tell them from a
# person's own (which always win): set with them by `child_env`.
FILLED = "HETERO_THREAD_DEFAULTS"
# Every variable that changes how fast CPU work runs (OpenMP and TVM read them once): what a
# run reports beside its times and what a measured choice is valid for. TVM's own pool
# spins 300000 sched_yields by default (TVM_THREAD_POOL_SPIN_COUNT; 0: 4.4 ms alone where
# the default ran 4.1, no better shared), which hetero leaves as it is.
THREAD_VARIABLES = (*THREAD_ENV, "OMP_NUM_THREADS", "TVM_NUM_THREADS", "TVM_THREAD_POOL_SPIN_COUNT")
_YES_NO = {"1": True, "0": False, "": False}

# (message prefix, category): torch's pytree shim warns whenever a treespec is built or
# unpickled (every capture, every process that receives a compiled partition). Prefixes
# without commas or colons: PYTHONWARNINGS splits on both.
KNOWN_WARNINGS: tuple[tuple[str, type[Warning]], ...] = (("`isinstance(treespec", FutureWarning),)


def filter_known_warnings() -> None:
    """Hide KNOWN_WARNINGS in this process (a pool initializer for hetero's workers)."""
    for prefix, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=re.escape(prefix), category=category)


def owns_cores(env: dict[str, str] | None = None) -> bool:
    """Whether OWN_CORES says no other program computes on this machine's cores."""
    value = (os.environ if env is None else env).get(OWN_CORES, "").strip()
    if value not in _YES_NO:
        raise ConfigError(
            f"{OWN_CORES}={value!r}: expected 1 (no other program computes on this machine's "
            f"cores: hetero's processes alone on them spin briefly before they sleep) or 0. "
            f"What to do: set it to 1 or 0, or unset it."
        )
    return _YES_NO[value]


def child_env(env: dict[str, str] | None = None, *, shares_cores: bool = False) -> dict[str, str]:
    """THREAD_ENV (with OWN_CORES_ENV over it where the person owns the cores and the child
    does not share them with another of hetero's compute processes) and the warning
    filters as environment variables for a child process, under what `env` (default: this
    process's environment) already sets, unless hetero set it there itself."""
    base = dict(os.environ if env is None else env)
    filled = set(base.get(FILLED, "").split(","))
    own = {k for k in THREAD_ENV if k in base and k not in filled}
    spin = owns_cores(base) and not shares_cores
    wanted = {**THREAD_ENV, **(OWN_CORES_ENV if spin else {})}
    out = {k: base[k] if k in own else v for k, v in wanted.items()}
    out[FILLED] = ",".join(k for k in wanted if k not in own)
    filters = [f"ignore:{prefix}:{category.__name__}" for prefix, category in KNOWN_WARNINGS]
    mine = [f for f in base.get("PYTHONWARNINGS", "").split(",") if f]
    out["PYTHONWARNINGS"] = ",".join([*(f for f in filters if f not in mine), *mine])
    return out


def apply() -> None:
    """Make this process and every child it starts run under hetero's settings (the CLI
    calls it first thing, before torch and OpenMP load)."""
    os.environ.update(child_env())
    filter_known_warnings()
