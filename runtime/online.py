"""Re-planning online: when a running deployment's measured stage times leave its plan's
predictions behind, ask for a plan priced with what was measured, and switch to it between
requests when it is predicted faster by a margin.

The runtime only watches numbers and switches; what a corrected cost model and a new plan
are is the caller's hook (`Retune`: `hetero.compile(feedback=True)` wires it to
calibration's fold, the planner and the compiler, whose cache rebuilds the partitions that
did not change for free). The executor calls `after_request` after every request and
`take` before every request; the switch happens in the executor, between requests.

Hysteresis, so that a deployment does not flap between plans:
- a deployment serves `warmup` requests before its times are compared;
- a round starts only when a stage (or a hop between devices) deviates from its prediction
  by more than `threshold` (relative) and `min_ms` (absolute);
- the running plan is re-priced with the corrected costs too: a switch needs the new plan
  predicted faster than the running one by `margin`, both priced by the same model;
- a round that keeps the plan updates its predictions (so the same deviation does not fire
  again); every round doubles the wait before the next one (`cooldown` requests, up to
  32x), so noisy measurements cannot make a deployment switch back and forth for long.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from hetero.runtime.metrics import MetricsSnapshot, ReplanEvent, RunMetrics
from hetero.runtime.replan import StagedPlan

log = logging.getLogger("hetero.runtime")


@dataclass(frozen=True)
class ReplanPolicy:
    """When to re-plan a running deployment, and when to switch to the new plan."""

    warmup: int = 8  # requests a deployment serves before its times are compared
    window: int = 8  # the last runs whose median is compared (and folded)
    # ... or this quantile of them: below 0.5 on a machine that other work loads, whose
    # spikes are not the deployment's cost
    quantile: float = 0.5
    threshold: float = 0.25  # relative deviation |measured - predicted| / predicted
    min_ms: float = 0.25  # ... and at least this many ms, so that tiny stages' jitter is ignored
    margin: float = 0.10  # the new plan must be predicted this much faster (a fraction)
    cooldown: int = 32  # requests between rounds; doubles after each round
    background: bool = True  # plan and compile in a thread; False: inside the request's call

    def __post_init__(self) -> None:
        if (
            self.warmup < 1
            or self.window < 1
            or self.cooldown < 0
            or not 0 <= self.margin < 1
            or not 0 < self.quantile < 1
        ):
            raise ValueError(
                "ReplanPolicy: warmup >= 1, window >= 1, cooldown >= 0, 0 <= margin < 1 and "
                f"0 < quantile < 1 (got {self})"
            )


@dataclass(frozen=True)
class Observation:
    """What a re-planning round starts from: the running deployment and its measurements."""

    deployment: StagedPlan
    snapshot: MetricsSnapshot
    request: int  # requests the executor served so far (all deployments)
    reason: str


@dataclass(frozen=True)
class Proposal:
    """A round's answer: the running deployment re-priced, and maybe a better plan."""

    current: StagedPlan  # the same stages, their predictions from the corrected costs
    current_ms: float  # the running plan, predicted with the corrected costs
    # the plan the corrected costs choose, compiled when it is predicted faster by the
    # margin (None: the same plan, or not worth compiling: `candidate_ms` says which)
    candidate: StagedPlan | None = None
    candidate_ms: float | None = None  # None: the corrected costs choose the running plan


Retune = Callable[[Observation], Proposal]


def deviations(deployment: StagedPlan, snap: MetricsSnapshot, policy: ReplanPolicy) -> list[str]:
    """Stages and cross-device hops whose median time is off its prediction by more than the
    policy allows, described for people ("p1 on cpu: 4.10 ms measured, 2.00 predicted")."""
    by_index = {s.index: s for s in deployment.stages}
    out = []
    for st in snap.stages:
        spec = by_index.get(st.index)
        if spec is None or spec.predicted_ms <= 0:
            continue
        if _off(st.stage_ms, spec.predicted_ms, policy):
            out.append(
                f"{spec.name} on {spec.device.name}: {st.stage_ms:.2f} ms measured, "
                f"{spec.predicted_ms:.2f} predicted"
            )
    plan = deployment.plan
    if plan is not None:
        predicted = {(t.src, t.dst): t for t in plan.transfers}
        for hop in snap.hops:
            t = predicted.get((hop.src, hop.dst))
            if (
                t is not None
                and t.src_device != t.dst_device
                and _off(hop.wait_ms, t.predicted_ms, policy)
            ):
                src = "input" if hop.src < 0 else f"p{hop.src}"
                out.append(
                    f"{src}->p{hop.dst} ({t.src_device}->{t.dst_device}): "
                    f"{hop.wait_ms:.2f} ms measured, {t.predicted_ms:.2f} predicted"
                )
    return out


def _off(measured: float, predicted: float, policy: ReplanPolicy) -> bool:
    gap = abs(measured - predicted)
    return gap > policy.min_ms and gap > policy.threshold * max(predicted, 1e-9)


class OnlineReplanner:
    """Watches one executor's deployments and hands it the next one to switch to."""

    def __init__(self, hook: Retune, policy: ReplanPolicy | None = None) -> None:
        self.hook = hook
        self.policy = policy or ReplanPolicy()
        self._lock = threading.Lock()
        self._deployed_at = 0  # request count when the running deployment took over
        self._next_round = 0  # no round before this request count
        self._rounds = 0  # rounds so far: each doubles the wait before the next
        self._running: threading.Thread | None = None
        self._result: tuple[Observation, Proposal | BaseException, float] | None = None
        self._closed = False

    # ---- called by the executor --------------------------------------------------------------
    def after_request(self, deployment: StagedPlan, metrics: RunMetrics, served: int) -> None:
        """After each request (cheap unless a round starts): compare, maybe start a round."""
        p = self.policy
        with self._lock:
            busy = self._running is not None or self._result is not None
            if self._closed or busy or served < max(self._next_round, self._deployed_at + p.warmup):
                return
        snap = metrics.snapshot(p.window, p.quantile)
        off = deviations(deployment, snap, p)
        if not off:
            return
        obs = Observation(deployment, snap, served, "; ".join(off))
        log.info("re-planning after request %d: %s", served, obs.reason)
        if not p.background:
            self._round(obs)
            return
        with self._lock:
            self._running = threading.Thread(
                target=self._round, args=(obs,), name="hetero-replan", daemon=True
            )
            self._running.start()

    def take(self, served: int) -> tuple[StagedPlan, ReplanEvent] | None:
        """Before each request: the deployment to switch to (a new plan, or the running one
        with corrected predictions) and the event to record, once a round finished."""
        with self._lock:
            if self._result is None:
                return None
            (obs, answer, seconds), self._result = self._result, None
        return self._decide(obs, answer, seconds, served)

    def wait(self, timeout: float | None = None) -> None:
        """Until the running round (if any) finished (tests, benchmarks)."""
        thread = self._running
        if thread is not None:
            thread.join(timeout)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._result = None

    # ---- inside ------------------------------------------------------------------------------
    def _round(self, obs: Observation) -> None:
        t0 = time.perf_counter()
        try:
            answer: Proposal | BaseException = self.hook(obs)
        except Exception as e:  # a failed round must not fail the deployment that serves
            log.warning("online re-planning failed: %s: %s", type(e).__name__, e)
            answer = e
        with self._lock:
            self._running = None
            if not self._closed:
                self._result = (obs, answer, time.perf_counter() - t0)

    def _decide(
        self, obs: Observation, answer: Proposal | BaseException, seconds: float, served: int
    ) -> tuple[StagedPlan, ReplanEvent] | None:
        p = self.policy
        if isinstance(answer, BaseException):
            self._backoff(served)
            event = ReplanEvent(
                obs.request,
                obs.reason,
                0.0,
                None,
                f"failed: {type(answer).__name__}: {answer}"[:300],
                seconds,
                served,
            )
            return obs.deployment, event
        faster = (
            answer.candidate is not None
            and answer.candidate_ms is not None
            and answer.candidate_ms <= answer.current_ms * (1.0 - p.margin)
        )
        if faster:
            outcome, chosen = "switched", answer.candidate
            self._deployed_at = served
            self._backoff(served + p.warmup)
        else:
            outcome = "kept" if answer.candidate_ms is not None else "repriced"
            chosen = answer.current
            self._backoff(served)
        event = ReplanEvent(
            obs.request,
            obs.reason,
            answer.current_ms,
            answer.candidate_ms,
            outcome,
            seconds,
            served,
        )
        level = logging.WARNING if faster else logging.INFO
        log.log(
            level,
            "online re-plan after request %d (%s): %s; running plan %.3f ms with corrected costs, "
            "best plan %s. %s\n%s",
            obs.request,
            obs.reason,
            outcome,
            answer.current_ms,
            "the same" if answer.candidate_ms is None else f"{answer.candidate_ms:.3f} ms",
            "Switched between requests; now running:" if faster else "Running plan:",
            chosen.explain(),
        )
        return chosen, event

    def _backoff(self, served: int) -> None:
        self._rounds += 1
        wait = self.policy.cooldown * 2 ** min(self._rounds - 1, 5)
        self._next_round = served + max(wait, 1)
