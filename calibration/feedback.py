"""Feedback: fold what running deployments measured into a calibration profile.

Two steps, both pure (no torch, no runtime):

1. `partition_runs` / `hop_runs` turn a plan's measured times into records (cluster/runs.py):
   each partition's time as the base cost model predicts it, cut into terms by the op class
   and shape bucket of its groups (`cost.group_key`), its call, and what the executor
   measured (the runner's call, the whole stage); each hop between devices with its link time.
2. `fold` fits, per (device, backend), one factor per term key and one on the partition
   call so that the base model's prediction matches the measured runner times:

       measured_r  ~  sum_k  f_k * base_rk  +  f_call * call_r

   in relative (log) error, with a weak pull of every log f toward the factor already in
   force (1 for a fresh profile), so that keys no record tells apart move together in
   proportion to their share of the time. Per class (over its buckets) and over all
   classes, the time-weighted mean of the fitted log factors becomes the fallback for
   groups of a bucket or class no run measured. The executor's own terms are medians: per
   stage, the whole stage minus the runner's call; per hop between devices, the measured
   time minus the link's.

The profile's microbenchmark factors stay as they were; corrections and runtime terms sit
beside them (`CalibrationProfile.corrections`, `.runtime`), and `CostModel` applies them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

import numpy as np

from hetero.cluster.profile import (
    ALL_CLASSES,
    CALL,
    CalibrationProfile,
    Correction,
    RuntimeProfile,
)
from hetero.cluster.runs import HopRun, PartitionRun, RunLog, Term
from hetero.partitioner.cost import group_key
from hetero.partitioner.plan import Plan
from hetero.partitioner.reprice import Pricing

PRIOR = 1e-4  # weight of the pull toward the factor in force, per log-factor squared
_LOG_MIN, _LOG_MAX = math.log(1e-3), math.log(1e4)


@dataclass(frozen=True)
class Measured:
    """What an executor measured for one plan partition (its pieces summed)."""

    runs: int
    runner_ms: float  # median of the runner's call
    stage_ms: float  # median of the whole stage on its worker


@dataclass(frozen=True)
class MeasuredHop:
    runs: int
    bytes: int  # per run
    wait_ms: float  # median: producer ready -> consumer starts


# ---- records ----------------------------------------------------------------------------------
def partition_runs(
    plan: Plan,
    priced: Pricing,
    measured: Mapping[int, Measured],
    *,
    executor: str,
    label: str = "",
) -> tuple[PartitionRun, ...]:
    """One record per resident partition of `plan` that ran (streamed and split partitions
    are priced by their weight copies, which these terms do not describe: left out)."""
    ctx = priced.context
    cm = ctx.cost_model.base()
    og = ctx.groups.opgraph
    out = []
    for p in plan.partitions:
        m = measured.get(p.index)
        if m is None or m.runs < 1 or p.weights != "resident":
            continue
        device = ctx.cluster.device(p.device)
        terms: dict[tuple[str, int], float] = {}
        for name in p.groups:
            g = ctx.groups[name]
            t = cm.group_time(
                g, [og[n] for n in g.nodes], device, backend=p.backend, scale=ctx.scale
            )
            if t > 0:
                key = group_key(g, device, ctx.scale)
                terms[key] = terms.get(key, 0.0) + t
        out.append(
            PartitionRun(
                device=device.name,
                model=device.model,
                kind=device.kind,
                backend=p.backend,
                executor=executor,
                runs=m.runs,
                measured_s=m.runner_ms / 1e3,
                stage_s=max(m.stage_ms, m.runner_ms) / 1e3,
                predicted_s=p.predicted_ms / 1e3,
                terms=tuple(Term(c, b, s) for (c, b), s in sorted(terms.items())),
                call_s=cm.runner_call(device, p.backend),
                label=f"{label or plan.model}/p{p.index}",
            )
        )
    return tuple(out)


def hop_runs(
    plan: Plan,
    priced: Pricing,
    measured: Mapping[tuple[int, int], MeasuredHop],
    *,
    executor: str,
) -> tuple[HopRun, ...]:
    """One record per transfer of `plan` between two devices that was measured."""
    ctx = priced.context
    cm = ctx.cost_model.base()
    out = []
    for t in plan.transfers:
        m = measured.get((t.src, t.dst))
        if m is None or m.runs < 1 or t.src_device == t.dst_device:
            continue
        out.append(
            HopRun(
                src=t.src_device,
                dst=t.dst_device,
                executor=executor,
                runs=m.runs,
                bytes=m.bytes,
                measured_s=m.wait_ms / 1e3,
                link_s=cm.link_time(ctx.cluster, t.src_device, t.dst_device, m.bytes),
                caller=t.src < 0,
            )
        )
    return tuple(out)


# ---- the fit -------------------------------------------------------------------------------------
def term_key(t: Term) -> str:
    return f"{t.op_class}@{t.bucket}"


def fold(profile: CalibrationProfile | None, log: RunLog) -> CalibrationProfile:
    """`profile` with the corrections and runtime terms `log` calls for: each (device,
    backend) the log measured is fitted again (centred on the factors in force), the rest
    kept. Without a profile, corrections of the cost model's defaults."""
    base = profile if profile is not None else CalibrationProfile(cluster=log.cluster)
    by_pair: dict[tuple[str, str], list[PartitionRun]] = {}
    for r in log.partitions:
        if r.measured_s > 0 and (r.terms or r.call_s > 0):
            by_pair.setdefault((r.device, r.backend), []).append(r)
    refit = set(by_pair)
    corrections = [c for c in base.corrections if (c.device, c.backend) not in refit]
    for (device, backend), records in sorted(by_pair.items()):
        prior = {c.key: c for c in base.corrections if (c.device, c.backend) == (device, backend)}
        corrections.extend(_fit_pair(device, backend, records, prior))
    runtime = _fold_runtime(base.runtime, log)
    return replace(base, corrections=tuple(corrections), runtime=runtime)


def _center(prior: Mapping[str, Correction], key: str) -> float:
    """log of the factor in force for `key` (exact, class, all classes), 0 without one."""
    if key == CALL:
        c = prior.get(CALL)
        return math.log(c.factor) if c is not None else 0.0
    cls = key.split("@", 1)[0]
    for k in (key, cls, ALL_CLASSES):
        if k in prior:
            return math.log(prior[k].factor)
    return 0.0


def _fit_pair(
    device: str, backend: str, records: list[PartitionRun], prior: Mapping[str, Correction]
) -> list[Correction]:
    keys = [*sorted({term_key(t) for r in records for t in r.terms}), CALL]
    col = {k: j for j, k in enumerate(keys)}
    a = np.zeros((len(records), len(keys)))
    for i, r in enumerate(records):
        for t in r.terms:
            a[i, col[term_key(t)]] += t.seconds
        a[i, col[CALL]] += r.call_s
    y = np.array([r.measured_s for r in records])
    theta0 = np.array([_center(prior, k) for k in keys])
    theta = _solve(a, y, theta0)
    pred = a @ np.exp(theta)
    errors = np.abs(pred - y) / y
    error = float(np.median(errors))
    model = records[0].model
    runs = {k: 0 for k in keys}
    for i, r in enumerate(records):
        for k in keys:
            if a[i, col[k]] > 0:
                runs[k] += r.runs
    out = [
        Correction(device, backend, k, float(math.exp(theta[col[k]])), runs[k], error, model)
        for k in keys
        if runs[k]
    ]
    # fallbacks: per class over its buckets, and over every class, weighted by base time
    weight = a.sum(axis=0)
    classes: dict[str, list[int]] = {}
    for k in keys[:-1]:
        classes.setdefault(k.split("@", 1)[0], []).append(col[k])
    for cls, cols in sorted(classes.items()):
        out.append(
            Correction(
                device,
                backend,
                cls,
                _mean_factor(theta, weight, cols),
                sum(runs[keys[j]] for j in cols),
                error,
                model,
            )
        )
    compute_cols = [col[k] for k in keys[:-1]]
    if compute_cols:
        out.append(
            Correction(
                device,
                backend,
                ALL_CLASSES,
                _mean_factor(theta, weight, compute_cols),
                sum(r.runs for r in records),
                error,
                model,
            )
        )
    return out


def _mean_factor(theta: np.ndarray, weight: np.ndarray, cols: list[int]) -> float:
    w = weight[cols]
    return float(math.exp(float(np.average(theta[cols], weights=w if w.sum() > 0 else None))))


def _solve(a: np.ndarray, y: np.ndarray, theta0: np.ndarray, iters: int = 200) -> np.ndarray:
    """argmin over theta of sum_r (log(a_r . exp(theta)) - log y_r)^2 + PRIOR |theta - theta0|^2
    (Levenberg-Marquardt; theta bounded to factors of 1e-3 .. 1e4)."""
    theta = theta0.copy()
    logy = np.log(y)

    def cost(th: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        f = np.exp(th)
        pred = np.maximum(a @ f, 1e-15)
        res = np.log(pred) - logy
        jac = a * f[None, :] / pred[:, None]
        return float(res @ res + PRIOR * ((th - theta0) ** 2).sum()), res, jac

    value, res, jac = cost(theta)
    mu = 1e-2
    eye = np.eye(len(theta))
    for _ in range(iters):
        grad = jac.T @ res + PRIOR * (theta - theta0)
        hess = jac.T @ jac + PRIOR * eye
        step = np.linalg.solve(hess + mu * np.diag(np.diag(hess) + 1e-12), -grad)
        trial = np.clip(theta + step, _LOG_MIN, _LOG_MAX)
        new_value, new_res, new_jac = cost(trial)
        if new_value < value:
            converged = value - new_value < 1e-12
            theta, value, res, jac = trial, new_value, new_res, new_jac
            mu = max(mu / 3, 1e-9)
            if converged:
                break
        else:
            mu *= 4
            if mu > 1e8:
                break
    return theta


def _weighted_median(values: Iterable[tuple[float, int]]) -> float | None:
    pairs = sorted(values)
    total = sum(w for _, w in pairs)
    if not pairs or total <= 0:
        return None
    acc = 0
    for v, w in pairs:
        acc += w
        if acc >= total / 2:
            return v
    return pairs[-1][0]


def _fold_runtime(existing: tuple[RuntimeProfile, ...], log: RunLog) -> tuple[RuntimeProfile, ...]:
    out = {r.executor: r for r in existing}
    for executor in sorted({r.executor for r in log.partitions} | {h.executor for h in log.hops}):
        parts = [r for r in log.partitions if r.executor == executor]
        hops = [h for h in log.hops if h.executor == executor]
        stage = _weighted_median((max(0.0, r.stage_s - r.measured_s), r.runs) for r in parts)
        hop = _weighted_median((max(0.0, h.measured_s - h.link_s), h.runs) for h in hops)
        old = out.get(executor)
        samples = sum(r.runs for r in parts) + sum(h.runs for h in hops)
        out[executor] = RuntimeProfile(
            executor,
            stage if stage is not None else (old.stage_overhead if old else 0.0),
            hop if hop is not None else (old.hop_overhead if old else 0.0),
            samples + (old.samples if old else 0),
        )
    return tuple(out[k] for k in sorted(out))


def error_table(log: RunLog, profile: CalibrationProfile) -> list[tuple[str, float, float]]:
    """(label, measured s, predicted s by `profile`'s corrections) per partition record:
    what the fit makes of each run (the runner's call plus the executor's stage work)."""
    rows = []
    for r in log.partitions:
        table = {
            c.key: c.factor
            for c in profile.corrections
            if (c.device, c.backend) == (r.device, r.backend)
        }
        pred = r.call_s * table.get(CALL, 1.0)
        for t in r.terms:
            f = table.get(term_key(t)) or table.get(t.op_class) or table.get(ALL_CLASSES, 1.0)
            pred += t.seconds * f
        rt = profile.runtime_for(r.executor)
        stage = rt.stage_overhead if rt is not None else 0.0
        rows.append((r.label, r.stage_s, pred + stage))
    return rows
