"""How many threads the host CPUs' decode stages use, chosen by timing whole decode steps.

A capped plan's CPU layers read their weights from host memory while the copy engine
streams other layers' weights over the link from the same memory, and the launching
thread and the CUDA driver want cores too. On an H200 host (run 19) the 13 CPU layers of
the 7B ran at 47 GB/s inside the decode step, against 62 GB/s calibrated beside a link
copy: an OpenMP team as wide as the machine waits at each barrier for its slowest thread,
and one preempted thread stalls the team. A team a core or two narrower may then read
faster; alone on a quiet machine the widest wins. Which count is best is a property of
the host, the plan and the load, so it is measured on the step it serves, like the CPU
programs (runtime/measured_choice.py): the same decode step (same token, same cache
position: it rewrites the same cache slot with the same values) timed at each count,
interleaved, the current count kept unless another beats it by a margin.

A compiled program recompiles at each new width (Dynamo guards on the thread count, as
global state): a candidate's untimed warm-up step takes that, and afterwards every program
runs at the one width it serves with.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from hetero.runtime.measured_choice import describe, fastest, time_candidates

log = logging.getLogger("hetero.runtime")

# Another count replaces the current one only where it is this much faster: the box's noise
# between interleaved trials is a few percent, and a narrower team on a quiet machine only
# gives back cores.
MARGIN = 0.03


@dataclass(frozen=True)
class ThreadChoice:
    """Per host CPU device, the threads its decode stages run with, and the median ms per
    decode step each candidate measured (labelled as `label` writes them)."""

    threads: Mapping[str, int]
    median_ms: Mapping[str, float] = field(default_factory=dict)

    @property
    def chosen(self) -> str:
        return label(self.threads)

    def note(self) -> str:
        return f"host threads: {self.chosen} chosen ({describe(dict(self.median_ms))})"


def label(threads: Mapping[str, int]) -> str:
    if len(threads) == 1:
        (n,) = threads.values()
        return f"{n} thread" + ("s" if n != 1 else "")
    return ", ".join(f"{d} {n}" for d, n in sorted(threads.items()))


def candidates(current: Mapping[str, int]) -> list[dict[str, int]]:
    """The current counts first, then each team one and two threads narrower, then half as
    wide (where a host's logical CPUs are hyperthreads, half may read as fast)."""
    out: list[dict[str, int]] = []
    for narrower in (lambda n: n, lambda n: n - 1, lambda n: n - 2, lambda n: n // 2):
        c = {d: max(1, narrower(n)) for d, n in current.items()}
        if c not in out:
            out.append(c)
    return out


def choose_threads(
    step: Callable[[], object],
    current: Mapping[str, int],
    apply: Callable[[Mapping[str, int]], None],
    *,
    warmup: int = 1,
    trials: int = 5,
    margin: float = MARGIN,
) -> ThreadChoice:
    """Times `step` (one whole decode step, finished when it returns) with each candidate
    applied, applies the fastest and returns it. `current`: the devices' counts now; where
    the step fails, they are put back before the error goes on."""
    options = candidates(current)
    if len(options) == 1:
        return ThreadChoice(dict(current))
    by_label = {label(c): c for c in options}
    try:
        timed = time_candidates(
            [(name, step) for name in by_label],
            warmup=warmup,
            trials=trials,
            before=lambda name: apply(by_label[name]),
        )
    except BaseException:
        apply(current)
        raise
    medians = {name: statistics.median(t) * 1e3 for name, t in timed.items()}
    best = by_label[fastest(medians, incumbent=label(current), margin=margin)]
    apply(best)
    choice = ThreadChoice(best, medians)
    log.info("decode %s", choice.note())
    return choice
