"""Measured backend choice: a partition compiled with every backend its device kind has, run
on the device with its real example inputs (the eager run's values `compile_partitions`
already holds), checked against that run, timed, and the fastest kept.

Which backends: those the registry has for the device's kind that import here, support
every op of the partition on the device and, for a partition that updates state in place,
hold state (`Backend.holds_state`). Only kinds the person did not pin
(`BackendAssignment.pinned`) and only CPUs and GPUs: an NPU partition runs emulated on the
host, where its time says nothing about the NPU. Streamed and split partitions keep their
backend (their pieces run through the streaming backend).

A backend that declares the device's kind among its `Backend.last_resort_kinds` (plain
eager on a GPU) is tried last, and only when no other candidate passed its check; one that
names a candidate in its `Backend.outclassed_by` (eager replayed as CUDA graphs, outclassed
by Inductor's program replayed) is tried after it, and only when it failed its check. The
plan records such a candidate as not measured, and why.

Timing: `calibration.timing.time_call` (the fastest of short rounds; a call longer than a
round's budget: the fastest of SLOW_SAMPLES calls); the candidates take turns, up to `ROUNDS`
times each, so that a burst of load on a shared machine falls on all of them rather than on
whichever ran during it; one left over RACE_WITHIN times the leader by a turn takes no more,
and a leader left alone takes no more either. On a GPU a round is GPU_CALLS calls back to
back, as a stream of requests runs them.

The check: a candidate's outputs within `agreement.tolerance` of the eager run's; a 16-bit
candidate over it (within RECHECK_WITHIN times) is judged again against the partition
computed in float32, and passes where it is no further from that than eager is.

Cached: one signed record per (candidates' artifact keys, device and thread settings) in
the artifact cache (`ArtifactCache.write_record`). The settings are read after every
candidate's `Backend.prepare_process` (TVM's first load sets TVM_BIND_THREADS: read before
it, the first compile's record had another key than the one a second compile looked for).
A later compile of the same partitions with the same backends and options reads the choice
and compiles only the chosen backend's artifact (a cache hit). Records from an incomplete
measurement (the budget ran out) are not kept.

Budget: `BackendChoice.budget_s` seconds of compiling and timing beyond the planned
backend's own compile, for the whole compile; past it the remaining partitions keep the
planned backend and the plan says which.

For the cost model: the plan's `predicted_ms` stay the cost model's (for the planned
backend, `BackendTiming.planned`); the measured times sit beside them in each
`PlannedPartition.choice`, and `measurements(plan)` lists them for whoever folds
measurements into calibration profiles.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import Artifact, CompileOptions, CompileUnit, Runner
from hetero.backends.cache import ArtifactCache
from hetero.backends.eager import torch_device
from hetero.backends.library_ops import defining_modules
from hetero.backends.registry import BackendRegistry
from hetero.backends.warming import Standby, Warming
from hetero.calibration.timing import time_call
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.compile_times import CompileClock
from hetero.environment import THREAD_VARIABLES
from hetero.errors import CompileError
from hetero.partitioner.decisions import BackendAssignment, BackendChoice
from hetero.partitioner.graph import OpNode
from hetero.partitioner.plan import BackendTiming, Plan
from hetero.paths import cache_root
from hetero.runtime.agreement import float32_outputs, output_error, tolerance

log = logging.getLogger("hetero.choice")

CHOICE_KINDS = frozenset({"cpu", "gpu"})
RECORD_KIND = "choices"
RECORD_VERSION = 1
ROUNDS = 3  # turns each candidate is timed in
ROUND_BUDGET_S = 0.05  # time_call's budget per turn
# A call longer than a turn's budget is timed as SLOW_SAMPLES calls, the first of the turn
# among them, rather than through time_call, which runs two untimed calls (a warm-up and
# one that sizes its rounds) before its five timed ones: for GPT-2 small on the 2-core box
# (1-2 s a call, 3 candidates, 3 turns) those were 18 of 63 calls, about 60 s. The
# candidate ran once already (its check) and a seconds-long call has nothing to warm.
SLOW_SAMPLES = 5  # as many as time_call's fewest rounds
# On a GPU a turn's rounds are this many calls back to back, one wait at the end, as a model
# serves a stream of requests: one call and its wait measured how soon a lone call ends, and
# ranked two candidates otherwise than a loop does. GPT-2 small on an H100 (run 46): Triton's
# program 2.257 ms a lone call, Inductor's replayed 2.279, so Triton was chosen; in the
# suite's loop the row ran 2.398 ms against reduce-overhead's 2.222.
GPU_CALLS = 10
# Above this many weight bytes over all candidates, they are loaded one at a time (each
# timed in its turns alone) rather than all at once, and their shared export (one more
# copy of the weights, held while the partition is measured) is not kept: the larger of
# ALTERNATE_MAX_BYTES and TOGETHER_SHARE of the device's memory. One at a time, each
# candidate exports the partition again, candidates that share a compile (inductor and
# inductor-cudagraphs) compile twice, nothing is warmed in another process and the chosen
# one is loaded a third time: a 0.75 GB Mixtral partition (5 candidates) on an H200 spent
# ~25 s of a 63 s compile on those under the old fixed 2 GiB bound.
ALTERNATE_MAX_BYTES = 2 << 30
TOGETHER_SHARE = 0.25
# Programs of fewer ops are not warmed in another process (backends/warming.py): starting
# one costs ~2.4 s (importing torch and the backend, dev box), about what Inductor takes to
# compile such a program itself at GPT-2 small's rate (532 ATen ops, 17-26 s).
WARM_MIN_OPS = 100
# A candidate whose warm call (the one after its check run) took this many times the
# fastest candidate's is not timed:
# it cannot win, and timing it took long (untuned TVM convolutions ran ResNet-18 at 12.7 s
# per call against inductor's 0.14 s: 21 timed calls, 9 of the compile's 10 minutes).
TIME_ONLY_WITHIN = 10.0
# After a turn, a candidate whose fastest time so far is over this many times the leader's
# takes no more turns: its recorded time is its best of those it took. A turn is noisy on a
# shared box, but not by 30%: the later turns only settle which of the close ones wins
# (GPT-2 small's turns took 7-8 s of a 55 s compile on the 2-core box, Inductor's and
# eager's at 1.3-1.5x TVM's).
RACE_WITHIN = 1.3
_NOTE_CHARS = 160
# A 16-bit candidate further from the eager run than the tolerance, but within this many
# times it, is judged again against the partition computed in float32 (`float32_outputs`),
# and kept where it is no further from that than the eager run is, times EXACT_SLACK (or
# the tolerance). The eager run rounds too: a small Mixtral's top-2 routing on near-tied
# logits put Inductor 3.0e-2 from eager, over the 3e-2 tolerance, while eager itself was
# 2.2e-2 from float32 and torch.compile's program 2.2e-2 (run 47); both Inductor
# candidates lost, and the partition ran eager under CUDA graphs at 2.6x torch.compile.
RECHECK_WITHIN = 10.0
EXACT_SLACK = 1.25


# A model with this many parameters gets its warming standbys before its capture
# (`early_standby`); its op count, the real test (WARM_MIN_OPS), is known only after, and
# capturing GPT-2 small took 3.4 s of the ~10.6 s a standby takes to get ready. A big model
# of few ops ends them once captured, having spent a core on them meanwhile.
EARLY_STANDBY_PARAMS = 1_000_000


def early_standby(model: torch.nn.Module) -> bool:
    """Whether `model` is large enough to start warming standbys before its capture."""
    return sum(p.numel() for p in model.parameters()) >= EARLY_STANDBY_PARAMS


@dataclass(frozen=True)
class ChoiceMeasurement:
    """One measured (partition, backend) pair: what the cost model's feedback folds in."""

    partition: int
    device: str
    backend: str
    nodes: tuple[str, ...]
    measured_ms: float
    planned: bool  # the backend `predicted_ms` prices
    predicted_ms: float  # the cost model's time for the partition through the planned backend
    chosen: bool


def measurements(plan: Plan) -> list[ChoiceMeasurement]:
    """Every backend time the measured choice recorded in `plan`, per partition."""
    out = []
    for p in plan.partitions:
        for i, t in enumerate(p.choice):
            if t.ms is not None:
                out.append(
                    ChoiceMeasurement(
                        p.index,
                        p.device,
                        t.backend,
                        p.nodes,
                        t.ms,
                        t.planned,
                        p.predicted_ms,
                        i == 0,
                    )
                )
    return out


@dataclass(frozen=True)
class Decision:
    """What the chooser decided for one partition."""

    backend: str
    artifact: Artifact
    timings: tuple[BackendTiming, ...]  # chosen first, then fastest first, then the failed
    cached: bool


class Chooser:
    """Chooses, compiles and remembers one backend per partition for one compile.

    `compile_partitions` calls `build` for each resident partition; `apply(plan)` then
    returns the plan with the chosen backends and their times.
    """

    def __init__(
        self,
        registry: BackendRegistry,
        assignment: BackendAssignment,
        choice: BackendChoice,
        cluster: ClusterSpec | None = None,
        clock: CompileClock | None = None,
    ) -> None:
        self.registry = registry
        # hears of every compile, cache hit and the measuring ("choice") of this compile
        self.clock = clock if clock is not None else CompileClock()
        self.assignment = assignment
        self.choice = choice
        self.cache: ArtifactCache | None = None  # the cache of the compile under way
        # Timing needs the device in this process: a cluster of several hosts is compiled
        # here and run elsewhere.
        self.local = cluster is None or len(cluster.hosts) == 1
        self.decisions: dict[int, Decision] = {}
        self.skip: set[int] = set()
        self.spent_s = 0.0
        self.over_budget: list[int] = []
        self.notes: list[str] = []
        self.cluster = cluster
        # per (backend, device kind), a warming process started ahead (`stand_by`) for its
        # first warming there
        self.standbys: dict[tuple[str, str], Standby] = {}
        # The chosen candidates' runners whose backend shares loads (`Backend.shares_loads`),
        # for the caller to hold until its stages loaded: the stage's load then reuses the
        # program instead of compiling it again (inductor, GPT-2 small: 3.3-4.8 s, 2 cores).
        self.held: list[Runner] = []

    # ---- which backends ------------------------------------------------------------------------
    def candidates(
        self, device: DeviceSpec, planned: str, ops: Sequence[OpNode], state: bool = False
    ) -> tuple[list[str], dict[str, str]]:
        """The backends that may run the partition (the planned one first, those that are
        only a last resort on this kind last) and, for the others of its kind, why not."""
        if (
            not self.choice.measured
            or device.kind not in CHOICE_KINDS
            or self.assignment.is_pinned(device.kind)
        ):
            return [planned], {}
        names, why = [planned], {}
        for name in self.registry.for_kind(device.kind):
            if name == planned:
                continue
            backend = self.registry.get(name)
            if device.kind not in (backend.choice_kinds or backend.device_kinds):
                continue
            if state and not backend.holds_state:
                why[name] = "updates state in place; this backend holds none"
                continue
            bad = _unsupported(backend, ops, device)
            if bad:
                why[name] = bad
                continue
            names.append(name)
        # stable: the registry's order otherwise; one outclassed after those that outclass it
        names[1:] = sorted(
            names[1:],
            key=lambda n: (self._last_resort(n, device), self._outclassed(n, names) is not None),
        )
        return names, why

    def stand_by(self, ops: int | None) -> None:
        """Start now, for each backend that warms on a device of the cluster the choice may
        measure, a process that gets ready to warm (`warming.Standby`) while the caller
        captures or plans a graph of `ops` ops (None: not captured yet): the first warming of
        the compile then starts without its imports and probes (10.6 s on the dev box).
        Nothing where nothing is measured here; for a graph below WARM_MIN_OPS (none of its
        partitions would be warmed) those started earlier end. `close` ends what no warming
        took."""
        if ops is not None and ops < WARM_MIN_OPS:
            self.close()
            return
        if not self.choice.measured or not self.local or self.cluster is None:
            return
        for device in self.cluster.devices:
            if device.kind not in CHOICE_KINDS or self.assignment.is_pinned(device.kind):
                continue
            # not `registry.for_kind`: its check of every backend's libraries imports TVM
            # (3 s), which would hold the standby back until the plan imports it anyway
            for name in self.registry.names():
                if (name, device.kind) in self.standbys:
                    continue
                try:
                    backend = self.registry.get(name)
                except Exception:  # as for_kind: a plug-in that fails to import is skipped
                    continue
                if (
                    device.kind in (backend.choice_kinds or backend.device_kinds)
                    and backend.can_warm(device)
                    and backend.available()
                    and (standby := backend.stand_by(device)) is not None
                ):
                    # inductor and inductor-cudagraphs warm through one module: one process
                    same = [
                        s
                        for (_, kind), s in self.standbys.items()
                        if kind == device.kind and s.module == standby.module
                    ]
                    if same:
                        standby.close()
                        standby = same[0]
                    self.standbys[name, device.kind] = standby

    def close(self) -> None:
        """Ends the standby processes no warming took."""
        for standby in self.standbys.values():
            standby.close()
        self.standbys.clear()

    def _last_resort(self, name: str, device: DeviceSpec) -> bool:
        return device.kind in self.registry.get(name).last_resort_kinds

    def _outclassed(self, name: str, among: Collection[str]) -> str | None:
        """The first of `among` that outclasses `name` (`Backend.outclassed_by`), or None."""
        return next((n for n in self.registry.get(name).outclassed_by if n in among), None)

    # ---- one partition -------------------------------------------------------------------------
    def build(
        self,
        index: int,
        unit: CompileUnit,
        device: DeviceSpec,
        planned: str,
        options_for: Callable[[str], CompileOptions],
        ops: Sequence[OpNode],
        reference: Sequence[Any],
        root: Path,
        state: bool = False,
    ) -> tuple[str, Artifact]:
        """The backend for partition `index` and its artifact (compiled, or from the
        artifact cache at `root`); `reference`: the eager run's values of its outputs."""
        if self.cache is None or self.cache.root != cache_root(root):
            self.cache = ArtifactCache(root)
        names = [planned] if index in self.skip else self.candidates(device, planned, ops, state)[0]
        if len(names) > 1 and (why_not := self._cannot_time(device)):
            self.notes.append(f"p{index}: {planned} kept without measuring ({why_not})")
            names = [planned]
        if len(names) == 1:
            return planned, self._artifact(planned, unit, device, options_for)
        for name in names:  # the settings the candidates' loads make, before they are named
            self.registry.get(name).prepare_process(device)
        if _weight_bytes(unit) * (len(names) + 1) <= _together_bytes(device):
            # The candidates that start from a torch.export of the partition (eager,
            # cudagraphs, inductor, inductor-cudagraphs, TVM) share one. Its program holds a
            # copy of the weights until this partition is decided: only where every candidate
            # is kept loaded at once anyway, so one more copy stays within that bound.
            unit = unit.sharing_exports()
        keys = {n: self.registry.get(n).artifact_key(unit, device, options_for(n)) for n in names}
        record_key = _record_key(keys, _device_identity(device))
        decision = self._from_record(record_key, keys, planned, unit, device, options_for)
        if decision is None:
            if self.spent_s >= self.choice.budget_s:
                self.over_budget.append(index)
                return planned, self._artifact(planned, unit, device, options_for)
            with self.clock.phase("choice"):
                decision, complete = self._measure(
                    names, planned, unit, device, options_for, reference
                )
            if complete:
                # under the conditions the candidates were timed in (after all of them
                # loaded); the same as above unless a load changed a setting unannounced
                self._write_record(keys, decision, _device_identity(device))
            else:
                self.over_budget.append(index)
        self.decisions[index] = decision
        return decision.backend, decision.artifact

    def _cannot_time(self, device: DeviceSpec) -> str:
        if not self.local:
            return "the cluster has several hosts; a partition is timed only where it runs"
        if device.kind == "gpu" and not torch.cuda.is_available():
            return "no CUDA device in this process to time on"
        return ""

    def _artifact(
        self,
        name: str,
        unit: CompileUnit,
        device: DeviceSpec,
        options_for: Callable[[str], CompileOptions],
    ) -> Artifact:
        assert self.cache is not None  # set by build()
        return self.cache.build(
            self.registry.get(name), unit, device, options_for(name), self.clock
        )

    def _measure(
        self,
        names: Sequence[str],
        planned: str,
        unit: CompileUnit,
        device: DeviceSpec,
        options_for: Callable[[str], CompileOptions],
        reference: Sequence[Any],
    ) -> tuple[Decision, bool]:
        """Compile, check and time each of `names` (the planned one first); (the decision,
        whether every candidate was tried within the budget)."""
        start = time.perf_counter()
        own = 0.0  # the planned backend's compile: paid with or without a choice

        def build(name: str) -> Artifact:
            nonlocal own
            t0 = time.perf_counter()
            try:
                return self._artifact(name, unit, device, options_for)
            finally:
                if name == planned:
                    own += time.perf_counter() - t0

        artifacts: dict[str, Artifact] = {}
        runners: dict[str, Runner] = {}
        best: dict[str, float] = {}
        notes: dict[str, str] = {}
        planned_error: CompileError | None = None
        acts = tuple(unit.example_inputs)
        together = _weight_bytes(unit) * len(names) <= _together_bytes(device)
        sync = _sync(device)
        calls = GPU_CALLS if device.kind == "gpu" else 1
        complete = True
        checked: dict[str, float] = {}  # seconds of each candidate's warm call
        # the partition's float32 outputs, made once a candidate needs them (None: not made)
        exact = functools.cache(lambda: self._float32_reference(unit, device))
        # the warmed candidates' artifacts (or compile errors), made before the others
        warming, prebuilt = (
            self._start_warmings(names, unit, device, build) if together else ({}, {})
        )
        for name in names:
            if name != planned and checked and self._last_resort(name, device):
                notes[name] = (
                    f"not measured: a last resort on a {device.kind}, and "
                    f"{', '.join(checked)} passed the check"
                )
                continue
            if name != planned and (better := self._outclassed(name, checked)):
                notes[name] = (
                    f"not measured: {better} passed the check, and runs its program better"
                )
                continue
            if name != planned and (
                self.spent_s + time.perf_counter() - start - own > self.choice.budget_s
            ):
                notes[name] = "not measured: the compile-time budget of the choice ran out"
                complete = False
                continue
            try:
                made = prebuilt.pop(name) if name in prebuilt else build(name)
                if isinstance(made, CompileError):
                    raise made
                artifacts[name] = made
            except CompileError as e:
                notes[name] = f"compile failed: {_short(e)}"
                planned_error = e if name == planned else planned_error
                continue
            try:
                # a backend that compiles lazily (inductor, cudagraphs) compiles here
                backend = self.registry.get(name)
                with self.clock.phase(f"first run {name}"):
                    if name in warming:  # waited for inside the load, as late as it can
                        run = backend.load_warmed(
                            artifacts[name], device, self._waiter(name, warming.pop(name))
                        )
                    else:
                        run = backend.load(artifacts[name], device)
                    got = run(*acts)
                    sync()
                err, tol = output_error(got, reference, options_for(name).dtype)
                passed = err <= tol or self._nearer_exact(
                    unit.name, name, got, err, tol, reference, exact
                )
                if passed:  # one warm call (the first may still compile or load)
                    checked[name] = _once(run, acts, sync)
            except Exception as e:  # a backend that cannot run the partition here loses
                notes[name] = f"run failed: {_short(e)}"
                continue
            if not passed:
                notes[name] = f"wrong values: relative error {err:.1e} > {tol:.0e}"
                continue
            if together:
                runners[name] = run
            elif not _too_slow(name, checked, notes):
                best[name] = _time(run, acts, sync, ROUNDS, calls)
                del run
                _release(device)
        for w in warming.values():  # candidates never loaded (the budget ran out)
            w.cancel()
        runners = {n: r for n, r in runners.items() if not _too_slow(n, checked, notes)}
        if runners:
            best = _alternate(runners, acts, sync, calls)
        fastest = min(best, key=best.__getitem__) if best else ""
        if fastest in runners and self.registry.get(fastest).shares_loads:
            self.held.append(runners[fastest])
        runners.clear()
        _release(device)
        self.spent_s += max(0.0, time.perf_counter() - start - own)
        if not best:
            if planned in artifacts:  # every candidate failed its check: as `fixed` would
                return Decision(
                    planned, artifacts[planned], _timings({}, notes, planned, planned), False
                ), complete
            if planned_error is not None:
                raise planned_error
            raise CompileError(
                f"partition {unit.name} on {device.name}: no backend could run it "
                f"({'; '.join(f'{k}: {v}' for k, v in notes.items())})"
            )
        chosen = min(best, key=best.__getitem__)
        timings = _timings(best, notes, chosen, planned)
        return Decision(chosen, artifacts[chosen], timings, False), complete

    def _nearer_exact(
        self,
        partition: str,
        name: str,
        got: Any,
        err: float,
        tol: float,
        reference: Sequence[Any],
        exact: Callable[[], tuple[Any, ...] | None],
    ) -> bool:
        """Whether a 16-bit candidate `err` from the eager run (over `tol`) is still no
        further from the float32 computation (`exact()`) than eager is (RECHECK_WITHIN)."""
        if tol <= tolerance(torch.float32) or err > RECHECK_WITHIN * tol:
            return False
        wide = exact()
        if wide is None:
            return False
        own, _ = output_error(reference, wide, None)
        mine, _ = output_error(got, wide, None)
        if mine > max(tol, EXACT_SLACK * own):
            return False
        self.notes.append(
            f"{partition}: {name} kept {err:.1e} from the 16-bit eager run (over {tol:.0e}): "
            f"{mine:.1e} from float32, where eager is {own:.1e}"
        )
        return True

    def _float32_reference(self, unit: CompileUnit, device: DeviceSpec) -> tuple[Any, ...] | None:
        """The partition computed in float32 (`agreement.float32_outputs`); None where it
        would not fit beside the candidates or cannot be made (the eager run's check stands)."""
        if 2 * _weight_bytes(unit) > _together_bytes(device):
            return None
        try:
            with self.clock.phase("float32 reference"):
                return float32_outputs(unit, torch_device(device))
        except Exception as e:  # no second opinion: the eager run's stands
            log.info("%s: no float32 reference (%s)", unit.name, _short(e))
            return None

    def _waiter(self, name: str, warming: Warming) -> Callable[[], object]:
        """The wait for `warming`, timed as its own phase (nested in the load's)."""

        def wait() -> bool:
            with self.clock.phase(f"warming {name}"):
                return warming.wait()

        return wait

    def _start_warmings(
        self,
        names: Sequence[str],
        unit: CompileUnit,
        device: DeviceSpec,
        build: Callable[[str], Artifact],
    ) -> tuple[dict[str, Warming], dict[str, Artifact | CompileError]]:
        """(per candidate whose backend compiles lazily and can do so in another process
        (backends/warming.py), that process, started now so that it compiles while this
        one compiles the others; the artifacts `build` made for them first, or its error).
        Only with another candidate to compile meanwhile, for a program that is not small
        (it would compile in about the time a process takes to start), and only where every
        candidate's weights fit at once (the process holds another copy): the caller's
        `together`."""
        warming: dict[str, Warming] = {}
        made: dict[str, Artifact | CompileError] = {}
        ops = sum(n.op == "call_function" for n in unit.module.graph.nodes)
        if len(names) < 2 or ops < WARM_MIN_OPS:
            return warming, made
        started: dict[str, Warming] = {}  # by `Backend.warming_key`
        # a library's operators the program calls: registered there before it is read
        imports = defining_modules(unit.module.graph)
        for name in names:
            backend = self.registry.get(name)
            if not backend.can_warm(device):
                continue
            try:
                made[name] = build(name)
            except CompileError as e:
                made[name] = e
                continue
            key = backend.warming_key(made[name], device)
            if key is not None and key in started:
                warming[name] = started[key]
                continue
            standby = self.standbys.pop((name, device.kind), None)
            w = backend.start_warming(made[name], device, standby, imports)
            if standby is not None:
                standby.close()  # where it was not handed the work
            if w is not None:
                warming[name] = w
                if key is not None:
                    started[key] = w
        return warming, made

    # ---- the record ------------------------------------------------------------------------------
    def _from_record(
        self,
        record_key: str,
        keys: Mapping[str, str],
        planned: str,
        unit: CompileUnit,
        device: DeviceSpec,
        options_for: Callable[[str], CompileOptions],
    ) -> Decision | None:
        assert self.cache is not None
        record = self.cache.read_record(RECORD_KIND, record_key)
        if not record or record.get("version") != RECORD_VERSION:
            return None
        chosen = record.get("chosen")
        if record.get("candidates") != dict(keys) or chosen not in keys:
            return None
        timings = tuple(
            BackendTiming(t["backend"], t["ms"], t.get("note", ""), t["backend"] == planned)
            for t in record.get("timings", ())
        )
        return Decision(chosen, self._artifact(chosen, unit, device, options_for), timings, True)

    def _write_record(
        self, keys: Mapping[str, str], decision: Decision, identity: dict[str, Any]
    ) -> None:
        assert self.cache is not None
        self.cache.write_record(
            RECORD_KIND,
            _record_key(keys, identity),
            {
                "version": RECORD_VERSION,
                "device": identity,
                "candidates": dict(keys),
                "chosen": decision.backend,
                "timings": [
                    {"backend": t.backend, "ms": t.ms, "note": t.note} for t in decision.timings
                ],
            },
        )

    # ---- the plan --------------------------------------------------------------------------------
    def apply(self, plan: Plan) -> Plan:
        """`plan` with each measured partition's chosen backend and times, and a note."""
        parts = []
        for p in plan.partitions:
            d = self.decisions.get(p.index)
            if d is not None:
                p = dataclasses.replace(
                    p, backend=d.backend, choice=d.timings, choice_cached=d.cached
                )
            parts.append(p)
        notes = list(plan.notes) + self.notes
        if self.decisions:
            cached = sum(d.cached for d in self.decisions.values())
            changed = sum(
                d.backend != next((t.backend for t in d.timings if t.planned), d.backend)
                for d in self.decisions.values()
            )
            notes.append(
                f"backend choice measured for {len(self.decisions)} partition(s) "
                f"({cached} from earlier records, {self.spent_s:.1f} s spent); "
                f"{changed} run another backend than planned"
            )
        if self.over_budget:
            shown = ", ".join(f"p{i}" for i in self.over_budget)
            notes.append(
                f"backend choice: its budget of {self.choice.budget_s:g} s ran out; {shown} "
                "chose among the backends measured by then, or kept the planned one (raise "
                "BackendChoice.budget_s, or compile again: what was measured is cached)"
            )
        return dataclasses.replace(plan, partitions=tuple(parts), notes=tuple(notes))


# ---- helpers ---------------------------------------------------------------------------------
def _unsupported(backend: Any, ops: Sequence[OpNode], device: DeviceSpec) -> str:
    """Why `backend` cannot run one of `ops` on `device` ("" when it can run them all)."""
    for op in ops:
        if op.op_class == "view":
            continue
        try:
            ok = backend.supports(op, device)
        except Exception as e:  # supports() must not raise; a raise is a "no"
            return f"{op.target}: supports() raised {type(e).__name__}: {e}"
        if not ok:
            return f"{op.target} unsupported: {getattr(ok, 'reason', '') or 'no reason given'}"
    return ""


def _weight_bytes(unit: CompileUnit) -> int:
    return sum(t.numel() * t.element_size() for t in unit.param_values.values())


def _together_bytes(device: DeviceSpec) -> float:
    """The most weight bytes, over all candidates, that are measured loaded at once."""
    return max(ALTERNATE_MAX_BYTES, TOGETHER_SHARE * device.memory)


def _sync(device: DeviceSpec) -> Callable[[], None]:
    if device.kind == "gpu" and torch.cuda.is_available():
        index = device.index
        return lambda: torch.cuda.synchronize(index)
    return lambda: None


def _release(device: DeviceSpec) -> None:
    gc.collect()
    if device.kind == "gpu" and torch.cuda.is_available():
        torch.cuda.empty_cache()


def _time(run: Runner, acts: tuple, sync: Callable[[], None], rounds: int, calls: int = 1) -> float:
    """Milliseconds per call, the fastest of `rounds` turns."""
    return 1e3 * min(_turn(run, acts, sync, calls) for _ in range(rounds))


def _turn(run: Runner, acts: tuple, sync: Callable[[], None], calls: int = 1) -> float:
    """Seconds per call in one turn: time_call's rounds (of at least `calls` calls), or for a
    call longer than the turn's budget the fastest of SLOW_SAMPLES calls, this turn's first
    among them."""
    samples = [_once(run, acts, sync)]
    if samples[0] < ROUND_BUDGET_S:
        return time_call(lambda: run(*acts), sync, ROUND_BUDGET_S, min_calls=calls)
    samples += [_once(run, acts, sync) for _ in range(SLOW_SAMPLES - 1)]
    return min(samples)


def _once(run: Runner, acts: tuple, sync: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    run(*acts)
    sync()
    return time.perf_counter() - t0


def _too_slow(name: str, checked: Mapping[str, float], notes: dict[str, str]) -> bool:
    """Whether `name`'s warm call took over TIME_ONLY_WITHIN times the fastest one so far
    (then `notes` says so and it is not timed)."""
    fastest = min(checked.values())
    if checked[name] <= TIME_ONLY_WITHIN * fastest:
        return False
    notes[name] = (
        f"not timed: a warm call took {1e3 * checked[name]:.1f} ms, over "
        f"{TIME_ONLY_WITHIN:g}x the fastest candidate's {1e3 * fastest:.1f} ms"
    )
    return True


def _alternate(
    runners: Mapping[str, Runner], acts: tuple, sync, calls: int = 1
) -> dict[str, float]:
    """Milliseconds per call of each runner, the fastest of its turns: up to ROUNDS turns
    each, taken in turn, and none after a turn that left it over RACE_WITHIN times the
    leader; no more turns at all once the leader is left alone."""
    best = {name: math.inf for name in runners}
    racing = dict(runners)
    for _ in range(ROUNDS):
        for name, run in racing.items():
            best[name] = min(best[name], _time(run, acts, sync, 1, calls))
        lead = min(best[n] for n in racing)
        racing = {n: r for n, r in racing.items() if best[n] <= RACE_WITHIN * lead}
        if len(racing) < 2:
            # a leader racing alone decides nothing more: its later turns only refined its
            # own time (GPT-2 small: 2 turns of 5 calls, ~1 s of the 2-core box's compile)
            break
    return best


def _timings(
    best: Mapping[str, float], notes: Mapping[str, str], chosen: str, planned: str
) -> tuple[BackendTiming, ...]:
    order = sorted(best, key=lambda n: (n != chosen, best[n]))
    out = [BackendTiming(n, best[n], "", n == planned) for n in order]
    out += [
        BackendTiming(n, None, notes[n], n == planned)
        for n in sorted(notes, key=lambda n: n != chosen)
    ]
    return tuple(out)


def _device_identity(device: DeviceSpec) -> dict[str, Any]:
    """What a measurement is valid for: the device, the machine it was timed on and, on a
    CPU, the thread settings it ran under (they reorder the candidates: the demo model's
    partition measured inductor 1.94 ms, TVM 1.98 with OpenMP spinning, and ran inductor
    6.8 ms, TVM 4.3 with OMP_WAIT_POLICY=PASSIVE)."""
    cpu = device.kind == "cpu"
    return {
        "kind": device.kind,
        "model": device.model,
        "index": device.index,
        "cores": device.cores,
        "threads": torch.get_num_threads() if cpu else 0,
        "thread_env": {k: os.environ.get(k, "") for k in THREAD_VARIABLES} if cpu else {},
        "host": socket.gethostname(),
    }


def _record_key(keys: Mapping[str, str], identity: Mapping[str, Any]) -> str:
    """The record of a choice among the artifacts `keys` measured under `identity`
    (`_device_identity`)."""
    body = {"v": RECORD_VERSION, "candidates": sorted(keys.items()), "device": dict(identity)}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:40]


def _short(e: BaseException) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= _NOTE_CHARS else text[: _NOTE_CHARS - 1] + "…"
