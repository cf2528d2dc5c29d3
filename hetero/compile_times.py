"""Where a compile's time went, phase by phase: what `hetero.compile` (and generation's
compile) spent capturing, planning, compiling each backend's partitions, measuring the
backend choice, writing and checking artifacts and loading them.

One `CompileClock` is made per compile and handed down to whatever does the work (no
global state: two compiles in one process, or in threads, keep their own). Phases nest
and are counted exclusively: a backend compile run inside the backend choice counts under
its backend, not under the choice, so the phases add up to the wall time less "other".
A backend reports what happened inside its compile (the Triton backend: fusion, codegen,
autotuning, kernels and configs) by returning it in its Manifest (`build_seconds`,
`build_counts`); the clock folds that in as the phase's parts.

The result, `CompileTimes`, is a frozen value on the compiled object: a one-line note in
`explain()` and a dict for benchmarks' JSON rows.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

# A phase that took a second or more is logged as it ends: a compile cut short (a job's
# time limit) still says where its time went.
log = logging.getLogger("hetero.compile")
_LOGGED_S = 1.0


@dataclass(frozen=True)
class PhaseTime:
    """One phase of a compile: its own seconds (nested phases excluded), how many times it
    ran, where its time went inside (`parts`, seconds: a subset of `seconds`) and what it
    worked through (`counts`: kernels, configs tried, cache hits)."""

    name: str
    seconds: float
    runs: int = 1
    parts: tuple[tuple[str, float], ...] = ()
    counts: tuple[tuple[str, int], ...] = ()

    def summary(self) -> str:
        """`triton 80.2 (autotune 61.0, codegen 2.1; 48 kernels, 412 configs)`."""
        inner = ", ".join(f"{n} {s:.1f}" for n, s in self.parts if s >= 0.05)
        counted = ", ".join(f"{c} {n}" for n, c in self.counts if c)
        detail = "; ".join(x for x in (inner, counted) if x)
        return f"{self.name} {self.seconds:.1f}" + (f" ({detail})" if detail else "")


@dataclass(frozen=True)
class CompileTimes:
    """A whole compile: wall seconds and its phases in the order they first ran."""

    total_s: float
    phases: tuple[PhaseTime, ...] = ()

    @property
    def other_s(self) -> float:
        """Wall time no phase accounts for (glue between phases)."""
        return max(0.0, self.total_s - sum(p.seconds for p in self.phases))

    def seconds(self, name: str) -> float:
        """A phase's seconds (0.0 when it did not run)."""
        return next((p.seconds for p in self.phases if p.name == name), 0.0)

    def note(self) -> str:
        """One line for explain(): `compile 142.3 s: export 9.1, plan 0.3, triton 80.2
        (autotune 61.0; 48 kernels, 412 configs), choice 32.9, ..., other 1.2`."""
        shown = [p.summary() for p in self.phases if p.seconds >= 0.05 or p.counts]
        if self.other_s >= 0.05:
            shown.append(f"other {self.other_s:.1f}")
        return f"compile {self.total_s:.1f} s: " + ", ".join(shown)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: {"total_s", "phases": [{"name", "seconds", "runs", "parts", "counts"}]}."""
        return {
            "total_s": round(self.total_s, 3),
            "other_s": round(self.other_s, 3),
            "phases": [
                {
                    "name": p.name,
                    "seconds": round(p.seconds, 3),
                    "runs": p.runs,
                    "parts": {n: round(s, 3) for n, s in p.parts},
                    "counts": dict(p.counts),
                }
                for p in self.phases
            ],
        }


@dataclass
class _Running:
    seconds: float = 0.0
    runs: int = 0
    parts: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)


class CompileClock:
    """Records the phases of one compile; `times()` is what it found so far.

    with clock.phase("plan"): ...          # timed, nested phases subtracted
    clock.add("triton", parts=..., counts=...)  # a backend's report, folded into its phase
    """

    def __init__(self) -> None:
        self._start = time.perf_counter()
        self._phases: dict[str, _Running] = {}
        self._nested: list[float] = []  # per open phase: seconds its nested phases took

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            inner = self._nested.pop()
            if self._nested:
                self._nested[-1] += elapsed
            self.add(name, elapsed - inner)
            if elapsed >= _LOGGED_S:
                log.info(
                    "%s: %.1f s (%.1f s since the compile started)",
                    name,
                    elapsed,
                    time.perf_counter() - self._start,
                )

    def add(
        self,
        name: str,
        seconds: float = 0.0,
        *,
        runs: int = 1,
        parts: Mapping[str, float] | None = None,
        counts: Mapping[str, int] | None = None,
    ) -> None:
        """Add to phase `name`: seconds measured elsewhere, and its parts and counts."""
        p = self._phases.setdefault(name, _Running())
        p.seconds += seconds
        p.runs += runs
        for k, v in (parts or {}).items():
            p.parts[k] = p.parts.get(k, 0.0) + float(v)
        for k, v in (counts or {}).items():
            p.counts[k] = p.counts.get(k, 0) + int(v)

    def times(self) -> CompileTimes:
        return CompileTimes(
            total_s=time.perf_counter() - self._start,
            phases=tuple(
                PhaseTime(
                    name,
                    p.seconds,
                    p.runs,
                    tuple(sorted(p.parts.items(), key=lambda kv: -kv[1])),
                    tuple(p.counts.items()),
                )
                for name, p in self._phases.items()
            ),
        )
