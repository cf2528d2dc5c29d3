"""Feedback: fold what running deployments measured into a calibration profile.

Two steps, both pure (no torch, no runtime):

1. `partition_runs` / `hop_runs` turn a plan's measured times into records (cluster/runs.py):
   each partition's time as the base cost model predicts it, cut into terms by the op class
   and shape bucket of its groups (`cost.group_key`), its call, and what the executor
   measured (the runner's call, the whole stage); each hop between devices with its link time.
2. `fold` fits, per (device, backend), one factor per term key and one on the partition
   call so that the base model's prediction matches the measured runner times:

       measured_r  ~  sum_k  f_k * base_rk  +  f_call * call_r

   in relative (log) error. A key's log factor is a sum of levels: the device's deviation,
   its op class's (the call is a class of its own) and its shape bucket's, each centred on
   the factor already in force (1 for a fresh profile) and each pulled toward 0 the harder
   the finer it is. What the records cannot tell apart lands on the coarsest level that
   explains it: one partition measured 30% slower than predicted prices every group of its
   device 30% slower, also in candidate plans that give the device other groups (and so the
   split point moves), while records of different mixes separate classes and buckets. Per
   class (over its buckets) and over all classes, the time-weighted mean of the fitted log
   factors is the fallback for groups of a bucket or class no run measured. The executor's
   own terms are medians: per stage, the whole stage minus the runner's call; per hop
   between devices, the measured time minus the link's.

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
from hetero.partitioner.cost import CostModel, default_runtime, group_key
from hetero.partitioner.decisions import ExecutorKind
from hetero.partitioner.host_dtype import retyped
from hetero.partitioner.plan import Plan
from hetero.partitioner.reprice import Pricing

PRIOR = 1e-6  # weight of the pull toward the factor in force, per log-factor squared: the device
PRIOR_CLASS = 3e-4  # an op class (or the partition call) apart from its device
PRIOR_KEY = 1e-3  # a shape bucket apart from its class
_LOG_MIN, _LOG_MAX = math.log(1e-3), math.log(1e4)


@dataclass(frozen=True)
class Measured:
    """What an executor measured for one plan partition (its pieces summed)."""

    runs: int
    runner_ms: float  # median of the runner's call
    stage_ms: float  # median of the whole stage on its worker
    # median of its split hand-offs' spans, x sent -> the CPU's rows back (None: not timed)
    cpu_rows_ms: float | None = None


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
        # priced as the planner prices them: a host CPU computing in another dtype than the
        # model's (a generation's bf16 copies) has its groups retyped (adapter.build_problem)
        dtype = ctx.host_dtypes.get(device.name, "")
        terms: dict[tuple[str, int], float] = {}
        for name in p.groups:
            g = ctx.groups[name]
            ops = [og[n] for n in g.nodes]
            ops = [retyped(op, dtype) for op in ops] if dtype else ops
            t = cm.group_time(g, ops, device, backend=p.backend, scale=ctx.scale)
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
    levels = _Levels.of(keys)
    psi = _solve(a, y, theta0, levels.matrix, levels.weights)
    theta = theta0 + levels.matrix @ psi
    pred = a @ np.exp(theta)
    error = float(np.median(np.abs(pred - y) / y))
    model = records[0].model
    runs = {k: 0 for k in keys}
    for i, r in enumerate(records):
        for k in keys:
            if a[i, col[k]] > 0:
                runs[k] += r.runs
    out = [
        Correction(device, backend, k, _factor(theta[col[k]]), runs[k], error, model)
        for k in keys
        if runs[k]
    ]
    # fallbacks for groups of a bucket or class no run measured: the time-weighted mean of
    # the fitted log factors, per class over its buckets and over all classes. Where the
    # records could not tell classes apart that is the device's factor; where they could, a
    # class nobody ran takes what the device's measured time says on average (the device
    # level alone can sit far from every class when classes pull apart: measured records of
    # similar mixes fitted with one class up and another down)
    weight = a.sum(axis=0)
    for cls in sorted(levels.classes):
        if cls == CALL:
            continue
        cols = [col[k] for k in keys if k.split("@", 1)[0] == cls]
        samples = sum(runs[keys[j]] for j in cols)
        factor = _mean_factor(theta, weight, cols)
        out.append(Correction(device, backend, cls, factor, samples, error, model))
    compute = [col[k] for k in keys if k != CALL]
    if compute:
        factor = _mean_factor(theta, weight, compute)
        samples = sum(r.runs for r in records)
        out.append(Correction(device, backend, ALL_CLASSES, factor, samples, error, model))
    return out


def _mean_factor(theta: np.ndarray, weight: np.ndarray, cols: list[int]) -> float:
    """The time-weighted mean of the fitted log factors of `cols`, as a factor."""
    w = weight[cols]
    return _factor(float(np.average(theta[cols], weights=w if w.sum() > 0 else None)))


def _factor(log_factor: float) -> float:
    return float(math.exp(min(max(log_factor, _LOG_MIN), _LOG_MAX)))


@dataclass(frozen=True)
class _Levels:
    """The fit's parameters: log factor of a key = its centre + the device's deviation + its
    class's + its own (the partition call: a class of its own). Each level is pulled toward 0
    the harder the finer it is, so that what the records cannot tell apart is put on the
    coarsest level that explains it: one partition measured 30% slow makes every term of its
    device 30% slower (groups it ran little of included), and a class or a bucket departs
    from the device's factor only as far as records of different mixes ask."""

    matrix: np.ndarray  # [keys, params]: 1 where a parameter adds to a key's log factor
    weights: np.ndarray  # [params]: each parameter's pull toward 0 (the device's first)
    classes: dict[str, int]  # class -> its parameter

    @classmethod
    def of(cls, keys: list[str]) -> _Levels:
        names = [k.split("@", 1)[0] for k in keys]
        classes = {c: 1 + i for i, c in enumerate(dict.fromkeys(names))}
        bucketed = [k for k in keys if "@" in k]
        own = {k: 1 + len(classes) + i for i, k in enumerate(bucketed)}
        m = np.zeros((len(keys), 1 + len(classes) + len(bucketed)))
        for i, (k, c) in enumerate(zip(keys, names, strict=True)):
            m[i, 0] = m[i, classes[c]] = 1.0
            if k in own:
                m[i, own[k]] = 1.0
        weights = np.array([PRIOR] + [PRIOR_CLASS] * len(classes) + [PRIOR_KEY] * len(own))
        return cls(m, weights, classes)


def _solve(
    a: np.ndarray,
    y: np.ndarray,
    theta0: np.ndarray,
    m: np.ndarray,
    weights: np.ndarray,
    iters: int = 200,
) -> np.ndarray:
    """argmin over psi of sum_r (log(a_r . exp(theta0 + m psi)) - log y_r)^2
    + sum_j weights_j psi_j^2 (Levenberg-Marquardt; psi bounded so that no factor leaves
    1e-3 .. 1e4 by much)."""
    psi = np.zeros(m.shape[1])
    logy = np.log(y)
    bound = _LOG_MAX - _LOG_MIN

    def cost(p: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
        f = np.exp(np.clip(theta0 + m @ p, _LOG_MIN, _LOG_MAX))
        pred = np.maximum(a @ f, 1e-15)
        res = np.log(pred) - logy
        jac = (a * f[None, :] / pred[:, None]) @ m
        return float(res @ res + (weights * p * p).sum()), res, jac

    value, res, jac = cost(psi)
    mu = 1e-2
    prior = np.diag(weights)
    for _ in range(iters):
        grad = jac.T @ res + weights * psi
        hess = jac.T @ jac + prior
        step = np.linalg.solve(hess + mu * np.diag(np.diag(hess) + 1e-12), -grad)
        trial = np.clip(psi + step, -bound, bound)
        new_value, new_res, new_jac = cost(trial)
        if new_value < value:
            converged = value - new_value < 1e-12
            psi, value, res, jac = trial, new_value, new_res, new_jac
            mu = max(mu / 3, 1e-9)
            if converged:
                break
        else:
            mu *= 4
            if mu > 1e8:
                break
    return psi


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
        # a term no record measured keeps its default (`default_runtime`), not 0
        old = out.get(executor) or default_runtime(ExecutorKind(executor))
        samples = sum(r.runs for r in parts) + sum(h.runs for h in hops)
        # a generation's split and streamed terms come from its own feedback
        # (calibration/generation.py), not from these records: kept as they are
        out[executor] = replace(
            old,
            stage_overhead=stage if stage is not None else old.stage_overhead,
            hop_overhead=hop if hop is not None else old.hop_overhead,
            samples=samples + old.samples,
        )
    return tuple(out[k] for k in sorted(out))


def corrected(cost_model: CostModel, log: RunLog, min_s: float) -> CostModel:
    """`cost_model` with `log` folded into its profile, leaving out the partitions below
    `min_s` both measured and predicted: to a fit, such a partition is jitter and per-call
    overhead (a 0.04 ms partition measured 0.6 ms priced every group of its device ~15x and
    kept a re-plan on a device slowed 25x). The run log keeps them (`hetero calibrate
    --from-runs` sees every partition)."""
    kept = tuple(r for r in log.partitions if max(r.measured_s, r.base_s) >= min_s)
    profile = fold(cost_model.profile, replace(log, partitions=kept))
    return replace(cost_model, profile=profile)


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
