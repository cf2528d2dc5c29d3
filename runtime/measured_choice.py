"""Run one of several equivalent programs, chosen by timing each on the calls it serves.

A small LM's CPU decode step is mostly dispatch: op by op it ran 1.09-1.12x transformers'
time per token, through Inductor's CPU code 0.89-0.96x (benchmarks/decode_ops_cpu.py, the
4-layer Qwen2). A 7B layer's step is a matrix-vector product bound by host memory, where a
compiled program may gain nothing and its kernels may be slower than oneDNN's. Which one
wins is a property of the program and the host, so it is measured where it runs, on the
real inputs of the requests it serves, as TVM's and Triton's autotuners time their
candidates; the plan never waits for it.

Only for programs whose calls finish before they return (the host CPU): a GPU call's wall
time is its launch.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

log = logging.getLogger("hetero.runtime")


class MeasuredChoice:
    """The first candidate serves the first `after` calls alone. Then every candidate with a
    `prepare(*args)` (a compile) prepares in a background thread, on copies of the inputs
    at `mutated` (what a call writes in place: the KV cache), while the first one keeps
    serving: a compile of Inductor's CPU code took 18 s on the 2-core development box, a
    stall no streaming request should see. Once all are prepared the candidates take calls
    in turn (`warmup` untimed each, then `trials` timed), and the one with the lowest median
    serves every later call. Every candidate must compute the same values with the same
    side effects: any of them may serve any call.

    `after`: a compile pays back only over many calls, so a program called fewer times than
    that never compiles (a short generation, most tests)."""

    def __init__(
        self,
        candidates: Sequence[tuple[str, Callable[..., Any]]],
        *,
        name: str,
        mutated: Sequence[int] = (),
        after: int = 32,
        warmup: int = 1,
        trials: int = 5,
    ) -> None:
        if not candidates:
            raise ValueError(f"{name}: no candidate programs to choose from")
        self.candidates = tuple(candidates)
        self.name = name
        self.mutated = frozenset(mutated)
        self.after = after
        self.warmup = warmup
        self.trials = trials
        self.times: dict[str, list[float]] = {n: [] for n, _ in self.candidates}
        self._seen = dict.fromkeys(self.times, 0)
        self._turn = 0
        self._preparing: threading.Thread | None = None
        self._last: tuple | None = None  # until the choice: settle() decides on these
        self.prepare_error: BaseException | None = None
        self.chosen: tuple[str, Callable[..., Any]] | None = (
            self.candidates[0] if len(self.candidates) == 1 else None
        )

    def settle(self) -> None:
        """Decides now, on the last call's inputs (a step run again on its own inputs
        rewrites the same cache slots), waiting for the preparation: what is measured next
        (a feedback round's request) is then the program that will serve. Nothing to do
        before the first call or after the choice."""
        args = self._last
        if self.chosen is not None or args is None:
            return
        self.after = 0
        if self._preparing is None:
            self._prepare(args)
        self._preparing.join()
        while self.chosen is None:
            self(*args)

    @property
    def medians_ms(self) -> dict[str, float]:
        return {n: statistics.median(t) * 1e3 for n, t in self.times.items() if t}

    def __call__(self, *args: Any) -> Any:
        if self.chosen is not None:
            return self.chosen[1](*args)
        self._last = args
        if self.after > 0:
            self.after -= 1
            return self.candidates[0][1](*args)
        if self._preparing is None:
            self._prepare(args)
        if self._preparing.is_alive():
            return self.candidates[0][1](*args)
        name, fn = self.candidates[self._turn % len(self.candidates)]
        self._turn += 1
        self._seen[name] += 1
        if self._seen[name] <= self.warmup:
            return fn(*args)
        t0 = time.perf_counter()
        out = fn(*args)
        self.times[name].append(time.perf_counter() - t0)
        if all(len(t) >= self.trials for t in self.times.values()):
            med = self.medians_ms
            best = min(med, key=med.__getitem__)
            self.chosen = next(c for c in self.candidates if c[0] == best)
            self._last = None
            log.info(
                "%s: %s chosen (%s)",
                self.name,
                best,
                ", ".join(f"{n} {ms:.3f} ms" for n, ms in sorted(med.items(), key=lambda x: x[1])),
            )
        return out

    def _prepare(self, args: tuple) -> None:
        """Starts the candidates' `prepare` on a thread of its own, with this call's inputs
        (those written in place copied) and its grad and inference modes (what a compiled
        program's guards check)."""
        copies = tuple(
            a.clone() if k in self.mutated and isinstance(a, torch.Tensor) else a
            for k, a in enumerate(args)
        )
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()
        steps = [fn.prepare for _, fn in self.candidates if hasattr(fn, "prepare")]

        def run() -> None:
            try:
                with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                    for step in steps:
                        step(*copies)
            except Exception as e:  # the candidate then serves as its own fallback says
                self.prepare_error = e
                log.warning("%s: preparing a candidate failed (%s)", self.name, e)

        self._preparing = threading.Thread(target=run, name=f"prepare {self.name}", daemon=True)
        self._preparing.start()
