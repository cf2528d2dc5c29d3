"""The Python API: `hetero.plan`, `hetero.compile` (capture -> plan -> compile -> executor)
and `hetero.deploy`. The edge: strings (objective, backend names) become typed decisions
here, and one backend registry is made here and handed to the planner, the compiler and
the runtime.

cm = hetero.compile(model, example_inputs, cluster="configs/clusters/edge-cpu-npu.yaml")
out = cm(*inputs)          # what model(*inputs) returns, within tolerance
print(cm.plan.explain())   # predicted and measured ms per partition
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileOptions
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
from hetero.interfaces.generate import CompiledLM, compile_lm
from hetero.partitioner.algorithms import plan as make_plan
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import BackendAssignment, Objective, Task
from hetero.partitioner.graph import OpGraph, capture
from hetero.partitioner.plan import Plan
from hetero.partitioner.split import flatten_inputs, unflatten_outputs


def default_cache_dir() -> Path:
    """HETERO_CACHE_DIR, else the user's cache directory (~/.cache/hetero)."""
    env = os.environ.get("HETERO_CACHE_DIR")
    if env:
        return Path(env)
    import platformdirs

    return Path(platformdirs.user_cache_dir("hetero"))


def resolve_cluster(cluster: ClusterSpec | str | os.PathLike[str] | None) -> ClusterSpec:
    """A ClusterSpec from a spec, a YAML path, "local" or "ray"/"auto" (a running Ray cluster)."""
    if cluster is None or cluster == "local":
        return ClusterSpec.local()
    if isinstance(cluster, ClusterSpec):
        return cluster
    if str(cluster) in ("ray", "auto") or str(cluster).startswith("ray://"):
        return ClusterSpec.from_ray(None if str(cluster) == "ray" else str(cluster))
    return ClusterSpec.from_yaml(cluster)


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
) -> Plan:
    """`hetero.plan`: partition `graph` over `cluster` for `objective` ("latency" or
    "throughput"). backends: device kind -> backend name (default gpu: triton, cpu/npu:
    tvm; a name the registry lacks, or a backend unavailable here, plans with eager and says
    so in the plan's notes). registry: the backends to choose from
    (default: the built-ins and the `hetero.backends` entry points). The rest as
    `hetero.partitioner.algorithms.plan` takes them."""
    registry = registry if registry is not None else default_registry()
    return make_plan(
        graph,
        resolve_cluster(cluster),
        Objective.parse(objective),
        backends=BackendAssignment.parse(backends),
        registry=registry,
        pins=pins,
        exclude=exclude,
        microbatches=microbatches,
        cost_model=cost_model,
        algorithm=algorithm,
        groups=groups,
    )


class CompiledModel:
    """A model planned and compiled for a cluster; call it like the model."""

    def __init__(self, graph: OpGraph, plan: Plan, cluster: ClusterSpec, stages, executor) -> None:
        self.graph = graph
        self.cluster = cluster
        self.stages = tuple(stages)
        self.executor = executor
        self._plan = plan

    # ---- calling ----------------------------------------------------------------------------
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        values = self.executor.run(flatten_inputs(self.graph, args, kwargs))
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
        missing = [n for n in self.input_names if n not in inputs]
        if missing:
            raise ConfigError(
                f"missing input(s) {missing}; the model takes {list(self.input_names)}"
            )
        values = self.executor.run({n: inputs[n] for n in self.input_names})
        out = {}
        for name, value_name in zip(self.output_names, self.graph.outputs, strict=True):
            out[name] = values[value_name] if value_name in values else inputs.get(value_name)
        return out

    def run_many(self, batch: Sequence[Sequence[Any]]) -> list[Any]:
        """Several requests, pipelined across stages where the executor can."""
        flat = [flatten_inputs(self.graph, tuple(x), {}) for x in batch]
        return [unflatten_outputs(self.graph, v) for v in self.executor.run_many(flat)]

    # ---- state --------------------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The plan, with measured milliseconds per partition once the model has run."""
        measured = self.executor.measured_ms()
        return self._plan.with_measured(measured) if measured else self._plan

    def ready(self) -> bool:
        probe = getattr(self.executor, "ready", None)
        return bool(probe()) if callable(probe) else True

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
    executor: str = "auto",
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
) -> CompiledModel | CompiledLM:
    """Capture, plan, compile every partition (cached) and start an executor.

    executor: "local" runs the partitions in this process, "ray" as one Ray actor per
    device; "auto" picks local when the cluster is this one machine, Ray otherwise.
    `graph` reuses a capture of the same model and inputs, `plan` a plan of that graph
    for this cluster. options: one CompileOptions for every backend, or backend name ->
    CompileOptions. registry: the backends to choose from (default: the built-ins and the
    `hetero.backends` entry points); planning, compiling and the workers all use it.

    task="generate": `model` is a causal LM (a transformers one, or a module with
    forward(input_ids, start) and its KV cache as buffers); returns a CompiledLM with
    `generate()`, planned per phase with a static cache of `max_length` positions for
    `batch_size` sequences (interfaces/generate.py). example_inputs are not needed.
    """
    from hetero.runtime.build import needed_outputs

    registry = registry if registry is not None else default_registry()
    if Task.parse(task) is Task.GENERATE:
        return compile_lm(
            model,
            resolve_cluster(cluster),
            max_length=max_length,
            batch_size=batch_size,
            backends=backends,
            cache_dir=Path(cache_dir) if cache_dir else default_cache_dir(),
            executor=executor,
            pins=pins,
            exclude=exclude,
            options=options if isinstance(options, Mapping) else None,
            cost_model=cost_model,
            registry=registry,
        )
    if example_inputs is None:
        raise ConfigError("hetero.compile needs example_inputs (or task='generate' for an LM)")
    goal = Objective.parse(objective)
    assignment = BackendAssignment.parse(backends)
    for opts in options.values() if isinstance(options, Mapping) else [options]:
        if opts is not None:
            registry.check_options(opts)
    if graph is None:
        graph = capture(model, example_inputs, dynamic_shapes)
    spec = resolve_cluster(cluster)
    build = _Builder(
        graph,
        goal,
        dict(
            backends=assignment,
            pins=pins,
            exclude=exclude,
            microbatches=microbatches,
            cost_model=cost_model,
        ),
        Path(cache_dir) if cache_dir else default_cache_dir(),
        example_inputs,
        options,
        registry,
    )
    stages, plan = build(spec, plan)
    kind = executor
    if kind == "auto":
        kind = "local" if len(spec.hosts) == 1 else "ray"
    if kind == "local":
        from hetero.runtime.executor import LocalExecutor

        runner = LocalExecutor(stages, needed_outputs(graph), registry, plan=plan)
    elif kind == "ray":
        import ray

        from hetero.interfaces.deploy import init_ray
        from hetero.runtime.ray_executor import RayExecutor

        if not ray.is_initialized():
            # A private, token-authenticated head for this process; emulated NPUs of this
            # host become the custom resource NPU workers ask for.
            npus = sum(1 for d in spec.devices if d.kind == "npu")
            init_ray(resources={"NPU": float(npus)} if npus else None)
        runner = RayExecutor(
            stages,
            needed_outputs(graph),
            cluster=spec,
            plan=plan,
            replan=build,  # devices gone for good: plan again over what is left
            registry=registry,
        )
    else:
        raise ConfigError(f"executor {executor!r} is not one of: auto, local, ray")
    return CompiledModel(graph, plan, spec, stages, runner)


class _Builder:
    """Plan a graph for a cluster and compile what the plan needs (cache hits for the rest).

    `hetero.compile` calls it once; the Ray executor calls it again, with the devices that
    are left, when some are gone for good.
    """

    def __init__(
        self, graph, objective, plan_kwargs, cache_dir, example_inputs, options, registry
    ) -> None:
        self.graph = graph
        self.objective = objective
        self.plan_kwargs = plan_kwargs
        self.cache_dir = cache_dir
        self.example_inputs = example_inputs
        self.options = options
        self.registry = registry

    def __call__(self, cluster: ClusterSpec, plan: Plan | None = None):
        from hetero.runtime.build import compile_plan

        if plan is None:
            plan = make_plan(
                self.graph, cluster, self.objective, registry=self.registry, **self.plan_kwargs
            )
        stages = compile_plan(
            self.graph,
            plan,
            cluster,
            self.cache_dir,
            registry=self.registry,
            example_inputs=self.example_inputs,
            options=self.options,
        )
        return stages, plan


def deploy(target: CompiledModel | str | os.PathLike[str], **kwargs: Any) -> Any:
    """A Ray actor handle serving `target` (a CompiledModel or a deploy config path)."""
    from hetero.interfaces.deploy import deploy as ray_deploy

    return ray_deploy(target, **kwargs)
