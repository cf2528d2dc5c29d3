"""The Python API: `hetero.plan` and `hetero.compile` (capture -> plan -> compile ->
executor); `hetero.deploy` is interfaces/deploy.py's. The edge: strings (objective, backend
names) become typed decisions here, and one backend registry is made here and handed to
the planner, the compiler and the runtime.

cm = hetero.compile(model, example_inputs, cluster="configs/clusters/edge-cpu-npu.yaml")
out = cm(*inputs)          # what model(*inputs) returns, within tolerance
print(cm.plan.explain())   # predicted and measured ms per partition
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileOptions
from hetero.backends.library_ops import defining_modules
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.connect import init_ray
from hetero.cluster.devices import NPU_RESOURCE
from hetero.cluster.reference import resolve_cluster
from hetero.cluster.runs import RunLog
from hetero.cluster.spec import ClusterSpec
from hetero.compile_times import CompileClock, CompileTimes
from hetero.errors import ConfigError
from hetero.interfaces.feedback import Feedback
from hetero.interfaces.generate import CompiledLM, compile_lm
from hetero.interfaces.validation import Contract
from hetero.partitioner.algorithms import plan as make_plan
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import (
    BackendAssignment,
    BackendChoice,
    Choose,
    ExecutorKind,
    FeedbackRounds,
    HostPrecision,
    Objective,
    Task,
)
from hetero.partitioner.graph import OpGraph, capture
from hetero.partitioner.plan import Plan
from hetero.partitioner.split import flatten_inputs, unflatten_outputs
from hetero.paths import cache_root
from hetero.runtime.build import compile_plan, needed_outputs
from hetero.runtime.choice import Chooser, early_standby
from hetero.runtime.executor import LocalExecutor
from hetero.runtime.online import OnlineReplanner, ReplanPolicy
from hetero.runtime.ray_executor import RayExecutor


def plan(
    graph: OpGraph,
    cluster: ClusterSpec | str | os.PathLike[str] | None,
    objective: Objective | str = "latency",
    *,
    backends: BackendAssignment | Mapping[str, str] | None = None,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    cost_model: CostModel | None = None,
    algorithm: str | None = None,
    registry: BackendRegistry | None = None,
    groups: Any = None,
    time_budget_s: float | None = None,
    progress: Any = None,
) -> Plan:
    """`hetero.plan`: partition `graph` over `cluster` for `objective` ("latency" or
    "throughput"). backends: device kind -> backend name (default gpu: triton, cpu/npu:
    tvm; a name the registry lacks, or a backend that does not compile for that kind, is a
    ConfigError; a backend unavailable here plans with eager and says so in the plan's
    notes). registry: the backends to choose from
    (default: the built-ins and the `hetero.backends` entry points). time_budget_s: seconds the
    default planner ("auto") may spend; progress: True for a progress bar, or a callable
    (phase, seconds spent, budget). The rest as `hetero.partitioner.algorithms.plan` takes
    them."""
    registry = registry if registry is not None else default_registry()
    return make_plan(
        graph,
        resolve_cluster(cluster),
        Objective.parse(objective),
        backends=_assignment(backends, registry),
        registry=registry,
        pins=pins,
        exclude=exclude,
        microbatches=microbatches,
        cost_model=cost_model,
        algorithm=algorithm,
        groups=groups,
        time_budget_s=time_budget_s,
        progress=progress,
    )


class CompiledModel:
    """A model planned and compiled for a cluster; call it like the model."""

    def __init__(
        self,
        graph: OpGraph,
        plan: Plan,
        cluster: ClusterSpec,
        stages,
        executor,
        *,
        settings: CompileSettings | None = None,
        registry: BackendRegistry | None = None,
        feedback: Feedback | None = None,
        compile_times: CompileTimes | None = None,
    ) -> None:
        self.graph = graph
        self.cluster = cluster
        self._stages = tuple(stages)
        self.executor = executor
        self.settings = settings  # what hetero.compile was asked (None: built by hand)
        self.registry = registry
        self.feedback = feedback  # run records and online re-planning (hetero.compile's)
        # where hetero.compile's time went (None: built by hand); a note in plan.explain()
        self.compile_times = compile_times
        self._plan = plan

    # ---- calling ----------------------------------------------------------------------------
    @functools.cached_property
    def contract(self) -> Any:
        """What a call may hold (interfaces/validation.py); checked before anything runs
        (a GPU input's values: before any output is handed back, `Contract.admit`)."""
        return Contract.from_graph(self.graph)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        admitted = self.contract.admit(flatten_inputs(self.graph, args, kwargs))
        values = self.executor.run(admitted.inputs)
        admitted.verdict()  # a GPU input's check, read once the request is queued
        return unflatten_outputs(self.graph, values)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.graph.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Stable names for the flattened outputs: output0, output1, ..."""
        return tuple(f"output{i}" for i in range(len(self.graph.outputs)))

    def run_flat(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named tensors in (by `input_names`), named tensors out (by `output_names`)."""
        admitted = self.contract.admit(inputs)
        values = self.executor.run({n: admitted.inputs[n] for n in self.input_names})
        admitted.verdict()
        out = {}
        for name, value_name in zip(self.output_names, self.graph.outputs, strict=True):
            out[name] = values[value_name] if value_name in values else inputs.get(value_name)
        return out

    def run_many(self, batch: Sequence[Sequence[Any]]) -> list[Any]:
        """Several requests, pipelined across stages where the executor can."""
        flat = [flatten_inputs(self.graph, tuple(x), {}) for x in batch]
        for inputs in flat:
            self.contract.check(inputs)
        return [unflatten_outputs(self.graph, v) for v in self.executor.run_many(flat)]

    # ---- state --------------------------------------------------------------------------------
    @property
    def stages(self) -> tuple:
        """The stages running now (another plan's after an online re-plan switched)."""
        deployment = getattr(self.executor, "deployment", None)
        return deployment.stages if deployment is not None else self._stages

    @property
    def plan(self) -> Plan:
        """The plan running now (re-planned online, with feedback), with measured
        milliseconds per partition once the model has run."""
        deployment = getattr(self.executor, "deployment", None)
        plan = deployment.plan if deployment is not None and deployment.plan else self._plan
        measured = self.executor.measured_ms()
        plan = plan.with_measured(measured) if measured else plan
        if self.compile_times is not None:
            plan = replace(plan, notes=(*plan.notes, self.compile_times.note()))
        return plan

    def run_log(self) -> RunLog:
        """What the running deployment measured, as records `hetero calibrate --from-runs`
        folds into the cluster's profile (with feedback=True: every deployment so far)."""
        fb = self.feedback
        if fb is None:
            if self.settings is None:
                raise ConfigError("run_log() needs a model made by hetero.compile")
            fb = _feedback(self.graph, self.cluster, self.settings, self.registry, None)
        deployment = getattr(self.executor, "deployment", None)
        if deployment is None:
            return RunLog(self.cluster.name)
        return fb.remember(deployment, self.executor.metrics.snapshot())

    def ready(self) -> bool:
        """Every partition answers (False while a worker restarts or the plan is rebuilt)."""
        probe = getattr(self.executor, "ready", None)
        return bool(probe()) if callable(probe) else True

    def accepts(self) -> bool:
        """A request may be queued now: ready, or recovering (the request waits for it)."""
        probe = getattr(self.executor, "accepts", None)
        return bool(probe()) if callable(probe) else self.ready()

    def status(self) -> tuple[str, str]:
        """(state, why): "ready", or "recovering" / "failed" with the fault behind it."""
        probe = getattr(self.executor, "status", None)
        return probe() if callable(probe) else ("ready", "")

    def shutdown(self) -> None:
        self.executor.shutdown()

    def __enter__(self) -> CompiledModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def compile(
    model: torch.nn.Module,
    example_inputs: Sequence[Any] | None = None,
    cluster: ClusterSpec | str | os.PathLike[str] | None = None,
    objective: Objective | str = "latency",
    dynamic_shapes: Any = None,
    backends: BackendAssignment | Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    executor: ExecutorKind | str = "auto",
    *,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
    cost_model: CostModel | None = None,
    graph: OpGraph | None = None,
    plan: Plan | None = None,
    registry: BackendRegistry | None = None,
    task: Task | str = Task.FORWARD,
    max_length: int = 256,
    batch_size: int = 1,
    feedback: bool | ReplanPolicy | FeedbackRounds = False,
    choose: BackendChoice | Choose | str | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    host_precision: HostPrecision | str = HostPrecision.MODEL,
) -> CompiledModel | CompiledLM:
    """Capture, plan, compile every partition (cached) and start an executor.

    executor: "local" runs the partitions in this process, "ray" as one Ray actor per
    device; "auto" picks local when the cluster is this one machine, Ray otherwise.
    `graph` reuses a capture of the same model and inputs, `plan` a plan of that graph
    for this cluster. options: one CompileOptions for every backend, or backend name ->
    CompileOptions. registry: the backends to choose from (default: the built-ins and the
    `hetero.backends` entry points); planning, compiling and the workers all use it.
    choose: "measured" compiles each CPU and GPU partition with every backend its device
    kind has (kinds not pinned in `backends`), times each on the device with the
    partition's inputs and keeps the fastest (cached: a second compile does not measure
    again; a `BackendChoice` sets the compile-time budget); "fixed" runs the assignment's
    backend. Default: $HETERO_CHOOSE, else "measured".
    progress(what, done, total): hears of each partition compiled (a progress bar).

    task="generate": `model` is a causal LM (a transformers one, or a module with
    forward(input_ids, start) and its KV cache as buffers); returns a CompiledLM with
    `generate()`, planned per phase with a static cache of `max_length` positions for
    `batch_size` sequences (interfaces/generate.py). example_inputs are not needed.

    feedback=True (or a ReplanPolicy): the measured stage times correct the cost model while
    the model serves, and when they leave the plan's predictions behind it is planned again
    with the corrected costs and switched between requests if the new plan is predicted
    faster by the policy's margin (interfaces/feedback.py, runtime/online.py); the rounds
    show in `cm.executor.metrics` and in the plan's notes. With task="generate", feedback=True
    runs one request after the build, prices the split layers' hand-offs as measured and
    rebuilds with the re-plan when it is predicted faster (`CompiledLM.feedback`), up to three
    rounds; `feedback=FeedbackRounds(rounds=..., budget_s=...)` bounds them.
    host_precision="fastest" lets a host CPU compute a float16 LM in bfloat16 copies where
    its measured rates make them faster; the default "model" keeps the model's mantissa
    (bfloat16 rows put a capped 7B's logits 3.5% off the GPU's: BENCHMARKS.md, run 28).
    """
    clock = CompileClock()
    registry = registry if registry is not None else default_registry()
    if not isinstance(feedback, bool | ReplanPolicy | FeedbackRounds):  # "no" would be true
        raise ConfigError(
            f"feedback={feedback!r}: give True, False, a hetero.runtime.online.ReplanPolicy (a "
            "forward model's thresholds) or a hetero.FeedbackRounds (a generation's rounds)"
        )
    if isinstance(feedback, FeedbackRounds) and Task.parse(task) is not Task.GENERATE:
        raise ConfigError(
            "FeedbackRounds bounds a generation's measured rounds at compile; a forward model "
            "re-plans online: pass feedback=True or a hetero.runtime.online.ReplanPolicy"
        )
    if Task.parse(task) is Task.GENERATE:
        if isinstance(feedback, ReplanPolicy):
            raise ConfigError(
                "a ReplanPolicy re-plans a forward model online; for task='generate' pass "
                "feedback=True (one measured request after the build, then a re-plan)"
            )
        return compile_lm(
            model,
            resolve_cluster(cluster),
            max_length=max_length,
            batch_size=batch_size,
            backends=backends,
            cache_dir=cache_root(cache_dir),
            executor=executor,
            pins=pins,
            exclude=exclude,
            options=options if isinstance(options, Mapping) else None,
            cost_model=cost_model,
            registry=registry,
            feedback=feedback,
            clock=clock,
            host_precision=host_precision,
        )
    if example_inputs is None:
        raise ConfigError("hetero.compile needs example_inputs (or task='generate' for an LM)")
    spec = resolve_cluster(cluster)
    kind = ExecutorKind.parse(executor, spec)
    # priced for the runtime that will run it (its measured per-stage and per-hop costs)
    with clock.phase("cost model"):
        cost_model = replace(cost_model or CostModel.load(cluster=spec), executor=kind)
    settings = _settings(
        registry,
        objective,
        backends,
        pins,
        exclude,
        microbatches,
        options,
        cache_dir,
        cost_model,
        choose,
    )
    if feedback:
        settings = replace(
            settings, feedback=feedback if isinstance(feedback, ReplanPolicy) else ReplanPolicy()
        )
    chooser = None
    if graph is None and early_standby(model):
        # its warming processes get ready while the model is captured and planned
        chooser = Chooser(registry, settings.backends, settings.choose, spec, clock)
        chooser.stand_by(None)
    if graph is None:
        try:
            with clock.phase("export"):
                graph = capture(model, example_inputs, dynamic_shapes)
        except BaseException:
            if chooser is not None:
                chooser.close()
            raise
    build = _Builder(graph, settings, example_inputs, registry, progress, clock, chooser)
    stages, plan = build(spec, plan)
    fb = online = None
    if settings.feedback is not None:
        fb = _feedback(graph, spec, settings, registry, build)
        online = OnlineReplanner(fb, settings.feedback)
    with clock.phase("load"):
        runner = _executor(kind, spec, stages, graph, plan, build, registry, online)
    build.held = ()  # the stages loaded what they share with the choice's runners
    return CompiledModel(
        graph,
        plan,
        spec,
        stages,
        runner,
        settings=settings,
        registry=registry,
        feedback=fb,
        compile_times=clock.times(),
    )


def _executor(kind: ExecutorKind, spec: ClusterSpec, stages, graph, plan, build, registry, online):
    """The executor that loads and runs the stages: in this process, or Ray actors."""
    if kind is ExecutorKind.LOCAL:
        return LocalExecutor(stages, needed_outputs(graph), registry, plan=plan, online=online)
    # A private, token-authenticated head on loopback for this process unless Ray runs
    # already; emulated NPUs of this host become the custom resource NPU workers ask for.
    npus = sum(1 for d in spec.devices if d.kind == "npu")
    init_ray(resources={NPU_RESOURCE: float(npus)} if npus else None)
    return RayExecutor(
        stages,
        needed_outputs(graph),
        cluster=spec,
        plan=plan,
        replan=build,  # devices gone for good: plan again over what is left
        registry=registry,
        online=online,
        imports=defining_modules(graph.program.graph),
    )


def _feedback(graph, cluster, settings: CompileSettings, registry, build) -> Feedback:
    return Feedback(
        graph,
        cluster,
        settings.objective,
        settings.plan_kwargs(),
        registry=registry,
        cost_model=settings.cost_model or CostModel.load(cluster=cluster),
        executor=settings.cost_model.executor if settings.cost_model else ExecutorKind.LOCAL,
        compile_plan=build,
        policy=settings.feedback,
    )


@dataclass(frozen=True)
class CompileSettings:
    """The choices a CompiledModel was made with, typed: what a re-plan (devices gone) and a
    rebuild in another process (interfaces/deploy.py's Recipe) use again."""

    objective: Objective
    backends: BackendAssignment
    pins: Mapping[str, str] | None = None
    exclude: tuple[str, ...] = ()
    microbatches: int = 1
    options: CompileOptions | Mapping[str, CompileOptions] | None = None
    cache_dir: Path | None = None  # the cache root (hetero/paths.py)
    cost_model: CostModel | None = None
    feedback: ReplanPolicy | None = None  # re-plan online from measurements (None: do not)
    choose: BackendChoice = field(default_factory=BackendChoice)  # measured or fixed

    def plan_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for partitioner.algorithms.plan besides graph and cluster."""
        return {
            "backends": self.backends,
            "pins": self.pins,
            "exclude": self.exclude,
            "microbatches": self.microbatches,
            "cost_model": self.cost_model,
        }


def _settings(
    registry: BackendRegistry,
    objective: Objective | str,
    backends: BackendAssignment | Mapping[str, str] | None,
    pins: Mapping[str, str] | None,
    exclude: Sequence[str],
    microbatches: int,
    options: CompileOptions | Mapping[str, CompileOptions] | None,
    cache_dir: str | os.PathLike[str] | None,
    cost_model: CostModel | None,
    choose: BackendChoice | Choose | str | None = None,
) -> CompileSettings:
    """hetero.compile's arguments typed once; options checked against the registry."""
    settings = CompileSettings(
        objective=Objective.parse(objective),
        backends=_assignment(backends, registry),
        pins=dict(pins) if pins else None,
        exclude=tuple(exclude),
        microbatches=microbatches,
        options=options,
        cache_dir=cache_root(cache_dir),
        cost_model=cost_model,
        choose=BackendChoice.parse(choose),
    )
    for opts in options.values() if isinstance(options, Mapping) else [options]:
        if opts is not None:
            registry.check_options(opts)
    return settings


def _assignment(
    backends: BackendAssignment | Mapping[str, str] | None, registry: BackendRegistry
) -> BackendAssignment:
    """`backends` typed, its names known to `registry` and each able to compile its kind."""
    assignment = BackendAssignment.parse(backends)
    kinds = list(backends) if isinstance(backends, Mapping) else None
    registry.check_assignment(assignment, kinds=kinds if backends is not None else ())
    return assignment


def prebuild(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    cluster: ClusterSpec | str | os.PathLike[str] | None = None,
    objective: Objective | str = "latency",
    dynamic_shapes: Any = None,
    backends: BackendAssignment | Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    options: CompileOptions | Mapping[str, CompileOptions] | None = None,
    cost_model: CostModel | None = None,
    registry: BackendRegistry | None = None,
    choose: BackendChoice | Choose | str | None = None,
) -> Plan:
    """Capture, plan and compile every partition into the cache, loading none of them: the
    plan, which `compile(..., plan=...)` then builds from cache hits. `hetero serve` runs
    it in a child process, so compiling never competes with the server for the GIL."""
    registry = registry if registry is not None else default_registry()
    settings = _settings(
        registry,
        objective,
        backends,
        pins,
        exclude,
        microbatches,
        options,
        cache_dir,
        cost_model,
        choose,
    )
    graph = capture(model, example_inputs, dynamic_shapes)
    build = _Builder(graph, settings, example_inputs, registry)
    return build(resolve_cluster(cluster))[1]


class _Builder:
    """Plan a graph for a cluster and compile what the plan needs (cache hits for the rest).

    `hetero.compile` calls it once; the Ray executor calls it again, with the devices that
    are left, when some are gone for good: then pins and exclusions that name a device no
    longer in the cluster lapse (a pinned device lost for good would fail every re-plan).
    """

    def __init__(
        self,
        graph: OpGraph,
        settings: CompileSettings,
        example_inputs: Sequence[Any],
        registry: BackendRegistry,
        progress: Callable[[str, int, int], None] | None = None,
        clock: CompileClock | None = None,
        chooser: Chooser | None = None,
    ) -> None:
        self.graph = graph
        self._chooser = chooser  # for the first build: made (its standbys started) earlier
        self.settings = settings
        self.example_inputs = example_inputs
        self.registry = registry
        self.progress = progress  # for the first build only: a re-plan has no display
        self.clock = clock  # likewise: hetero.compile's times are the first build's
        self._planned = self._replanning = False
        self.held: tuple = ()  # the first build's chosen runners (Chooser.held)

    def __call__(self, cluster: ClusterSpec, plan: Plan | None = None):
        s = self.settings
        self._replanning = self._planned
        if self._planned:  # a re-plan: pins and exclusions of devices now gone lapse
            s = _present(cluster, s)
        self._planned = True
        clock = CompileClock() if self._replanning or self.clock is None else self.clock
        chooser = self._chooser or Chooser(self.registry, s.backends, s.choose, cluster, clock)
        self._chooser = None
        try:
            # its warming processes get ready while the graph is planned (started earlier:
            # ended here where the graph is too small to warm)
            chooser.stand_by(len(self.graph.nodes))
            if plan is None:
                with clock.phase("plan"):
                    plan = make_plan(
                        self.graph, cluster, s.objective, registry=self.registry, **s.plan_kwargs()
                    )
            stages = compile_plan(
                self.graph,
                plan,
                cluster,
                cache_root(s.cache_dir),
                registry=self.registry,
                example_inputs=self.example_inputs,
                options=s.options,
                chooser=chooser,
                progress=None if self._replanning else self.progress,
            )
        finally:
            chooser.close()
        if not self._replanning:
            self.held = tuple(chooser.held)  # until hetero.compile loaded the stages
        return stages, chooser.apply(plan)


def _present(cluster: ClusterSpec, settings: CompileSettings) -> CompileSettings:
    """`settings` less the pins and exclusions that name devices `cluster` no longer has."""

    def here(name: str) -> bool:
        try:
            cluster.device(name)
        except ConfigError:
            return False
        return True

    pins = {k: d for k, d in (settings.pins or {}).items() if here(d)}
    return replace(
        settings,
        pins=pins or None,
        exclude=tuple(d for d in settings.exclude if here(d)),
    )
