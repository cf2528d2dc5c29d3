"""The timing harness every measurement goes through."""

from __future__ import annotations

import time
from collections.abc import Callable

# (what, done, total): how calibration tells a caller how far it is (a progress bar;
# total 0: not known)
Progress = Callable[[str, int, int], None]


def time_call(
    fn: Callable[[], object],
    sync: Callable[[], None] = lambda: None,
    budget: float = 0.15,
    min_calls: int = 1,
) -> float:
    """Seconds per call: warm up, then short rounds (about 1 ms each, at least `min_calls`
    calls back to back) within `budget` seconds, keeping the fastest. On a shared machine
    the slower rounds measure other processes, not the op, and a short round is likelier to
    run undisturbed."""
    fn()
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    once = max(time.perf_counter() - t0, 1e-7)
    inner = max(min_calls, min(1000, int(1e-3 / once)))
    reps = max(5, min(300, int(budget / (once * inner))))
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / inner)
    return best
