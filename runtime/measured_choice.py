"""Run one of several equivalent programs, chosen by timing each on real inputs.

A small LM's CPU decode step is mostly dispatch: op by op it ran 1.09-1.12x transformers'
time per token, through Inductor's CPU code 0.89-0.96x (benchmarks/decode_ops_cpu.py, the
4-layer Qwen2). A 7B layer's step is a matrix-vector product bound by host memory, where a
compiled program may gain nothing and its kernels may be slower than oneDNN's. Which one
wins is a property of the program and the host, so it is measured where it runs, on the
inputs of a real call, as TVM's and Triton's autotuners time their candidates.

The choice is made when the caller asks (`settle`: a feedback round, before it measures),
never in the middle of serving: a cold compile of Inductor's CPU code took 18 s on the
2-core development box, and compiling in a background thread while the process exported
another model broke both traces (torch's tracing state is not per thread).

Only for programs whose calls finish before they return (the host CPU): a GPU call's wall
time is its launch.
"""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.runtime.agreement import output_error

log = logging.getLogger("hetero.runtime")


@dataclass(frozen=True)
class ProgramChoice:
    """A made choice: the program `stage` (and every stage sharing its program) runs, and
    the median ms per call each candidate measured."""

    stage: str
    chosen: str
    median_ms: Mapping[str, float] = field(default_factory=dict)

    def note(self) -> str:
        return f"{self.stage}: {self.chosen} chosen ({describe(dict(self.median_ms))})"


class MeasuredChoice:
    """The first candidate serves every call until `settle()`, which runs the last call's
    inputs through the candidates in turn (`warmup` untimed calls each: a compiled one
    compiles there; then `trials` timed) and keeps the one with the lowest median. Running
    a step again on its own inputs rewrites the same cache slots with the same values, and
    every candidate must compute the same values with the same side effects."""

    def __init__(
        self,
        candidates: Sequence[tuple[str, Callable[..., Any]]],
        *,
        name: str,
        warmup: int = 1,
        trials: int = 5,
    ) -> None:
        if not candidates:
            raise ValueError(f"{name}: no candidate programs to choose from")
        self.candidates = tuple(candidates)
        self.name = name
        self.warmup = warmup
        self.trials = trials
        self.times: dict[str, list[float]] = {n: [] for n, _ in self.candidates}
        self._last: tuple | None = None  # until the choice: settle() decides on these
        self.chosen: tuple[str, Callable[..., Any]] | None = (
            self.candidates[0] if len(self.candidates) == 1 else None
        )

    @property
    def medians_ms(self) -> dict[str, float]:
        return {n: statistics.median(t) * 1e3 for n, t in self.times.items() if t}

    def made(self) -> ProgramChoice | None:
        """The choice once `settle` measured it; None before (or with one candidate only)."""
        if self.chosen is None or not self.times[self.chosen[0]]:
            return None
        return ProgramChoice(self.name, self.chosen[0], self.medians_ms)

    def __call__(self, *args: Any) -> Any:
        if self.chosen is not None:
            return self.chosen[1](*args)
        self._last = args
        return self.candidates[0][1](*args)

    def settle(self, skip: Collection[str] = ()) -> None:
        """Decides on the last call's inputs; nothing to do before a first call or after
        the choice. `skip`: candidates not tried (one that compiles, where the caller will not
        wait for that); they go with the others not kept, and where fewer than two are left
        to try nothing is decided."""
        args = self._last
        if self.chosen is not None or args is None:
            return
        tried = [c for c in self.candidates if c[0] not in skip]
        if len(tried) < 2:  # nothing to choose among: left open for a settle that tries all
            return
        tried = self._agreeing(tried, args)
        timed = time_candidates(tried, args, warmup=max(0, self.warmup - 1), trials=self.trials)
        for name, times in timed.items():
            self.times[name].extend(times)
        best = fastest(self.medians_ms)
        self.chosen = next(c for c in self.candidates if c[0] == best)
        # the others go: a compiled program, or another copy of the weights (packed ones)
        self.candidates = (self.chosen,)
        self._last = None
        log.info("%s: %s chosen (%s)", self.name, best, describe(self.medians_ms))

    def _agreeing(
        self, tried: list[tuple[str, Callable[..., Any]]], args: tuple
    ) -> list[tuple[str, Callable[..., Any]]]:
        """`tried` less the candidates whose outputs on `args` disagree with the first's (the
        program that has served until now), each said in the log: a kernel wrong on this host
        (a vector path a test machine never ran) must lose the choice, not win it by being
        fast. These calls are the candidates' first warm-up."""
        name0, first = tried[0]
        ref = [_detached(t) for t in pytree.tree_leaves(first(*args))]
        kept = [tried[0]]
        for name, fn in tried[1:]:
            why = _disagreement(pytree.tree_leaves(fn(*args)), ref)
            if why is None:
                kept.append((name, fn))
            else:
                log.warning("%s: %s left out: its outputs differ from %s's (%s)", self.name,
                            name, name0, why)  # fmt: skip
        return kept


def _detached(x: Any) -> Any:
    return x.detach().clone() if isinstance(x, torch.Tensor) else x


def _disagreement(outs: list[Any], ref: list[Any]) -> str | None:
    """Why `outs` are not `ref`, or None where they agree: the measured backend choice's
    test of equivalence (runtime/agreement.py), and each tensor in the reference's dtype
    (what the stages after this one take)."""
    for k, (a, b) in enumerate(zip(outs, ref, strict=False)):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype != b.dtype:
            return f"output {k}: {a.dtype} against {b.dtype}"
    worst, tol = output_error(outs, ref, None)
    return None if worst <= tol else f"relative error {worst:.2e} where {tol:g} is allowed"


def time_candidates(
    candidates: Sequence[tuple[str, Callable[..., Any]]],
    args: tuple = (),
    *,
    warmup: int,
    trials: int,
    before: Callable[[str], None] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each candidate on `args`: `warmup` untimed calls each (a compiled
    one compiles there), then `trials` timed rounds, interleaved so that every candidate
    sees the same machine (a neighbour's burst lands on all of them, not on one).
    `before(name)` runs untimed ahead of each of that candidate's calls (a setting the
    candidates differ in, applied outside the clock)."""
    for name, fn in candidates:
        for _ in range(warmup):
            if before is not None:
                before(name)
            fn(*args)
    times: dict[str, list[float]] = {n: [] for n, _ in candidates}
    for _ in range(trials):
        for name, fn in candidates:
            if before is not None:
                before(name)
            t0 = time.perf_counter()
            fn(*args)
            times[name].append(time.perf_counter() - t0)
    return times


def fastest(medians: dict[str, float], *, incumbent: str | None = None, margin: float = 0.0) -> str:
    """The name with the lowest median; where an `incumbent` is given, another must beat it
    by `margin` (a fraction) to replace it: a tie within the noise keeps what runs."""
    best = min(medians, key=medians.__getitem__)
    if incumbent is not None and medians[best] > medians[incumbent] * (1.0 - margin):
        return incumbent
    return best


def describe(medians: dict[str, float]) -> str:
    return ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(medians.items(), key=lambda x: x[1]))
