"""The Python API: `hetero.compile` (capture -> plan -> compile -> executor) and `hetero.deploy`.

cm = hetero.compile(model, example_inputs, cluster="configs/clusters/edge-cpu-npu.yaml")
out = cm(*inputs)          # what model(*inputs) returns, within tolerance
print(cm.plan.explain())   # predicted and measured ms per partition
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError
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


class CompiledModel:
    """A model planned and compiled for a cluster; call it like the model."""

    def __init__(self, graph: OpGraph, plan: Plan, cluster: ClusterSpec, stages, executor) -> None:
        self.graph = graph
        self.cluster = cluster
        self.stages = tuple(stages)
        self.executor = executor
        self._plan = plan

    # ---- calling ----------------------------------------------------------------------------
    @functools.cached_property
    def contract(self) -> Any:
        """What a call may hold (interfaces/validation.py); checked before anything runs."""
        from hetero.interfaces.validation import Contract

        return Contract.from_graph(self.graph)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inputs = flatten_inputs(self.graph, args, kwargs)
        self.contract.check(inputs)
        return unflatten_outputs(self.graph, self.executor.run(inputs))

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(self.graph.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        """Stable names for the flattened outputs: output0, output1, ..."""
        return tuple(f"output{i}" for i in range(len(self.graph.outputs)))

    def run_flat(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Named tensors in (by `input_names`), named tensors out (by `output_names`)."""
        self.contract.check(inputs)
        values = self.executor.run({n: inputs[n] for n in self.input_names})
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
    def plan(self) -> Plan:
        """The plan, with measured milliseconds per partition once the model has run."""
        measured = self.executor.measured_ms()
        return self._plan.with_measured(measured) if measured else self._plan

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
    example_inputs: Sequence[Any],
    cluster: ClusterSpec | str | os.PathLike[str] | None = None,
    objective: str = "latency",
    dynamic_shapes: Any = None,
    backends: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    executor: str = "auto",
    *,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    options: Any = None,
    cost_model: Any = None,
    graph: OpGraph | None = None,
    plan: Plan | None = None,
) -> CompiledModel:
    """Capture, plan, compile every partition (cached) and start an executor.

    executor: "local" runs the partitions in this process, "ray" as one Ray actor per
    device; "auto" picks local when the cluster is this one machine, Ray otherwise.
    `graph` reuses a capture of the same model and inputs, `plan` a plan of that graph
    for this cluster.
    """
    from hetero.runtime.build import needed_outputs

    if graph is None:
        graph = capture(model, example_inputs, dynamic_shapes)
    spec = resolve_cluster(cluster)
    build = _Builder.of(
        graph, objective, backends, pins, exclude, microbatches, cost_model, cache_dir,
        example_inputs, options,
    )  # fmt: skip
    stages, plan = build(spec, plan)
    kind = executor
    if kind == "auto":
        kind = "local" if len(spec.hosts) == 1 else "ray"
    if kind == "local":
        from hetero.runtime.executor import LocalExecutor

        runner = LocalExecutor(stages, needed_outputs(graph), plan=plan)
    elif kind == "ray":
        from hetero.interfaces.deploy import ensure_ray
        from hetero.runtime.ray_executor import RayExecutor

        ensure_ray(spec)  # a private, token-authenticated head on loopback unless Ray runs
        runner = RayExecutor(
            stages,
            needed_outputs(graph),
            cluster=spec,
            plan=plan,
            replan=build,  # devices gone for good: plan again over what is left
        )
    else:
        raise ConfigError(f"executor {executor!r} is not one of: auto, local, ray")
    return CompiledModel(graph, plan, spec, stages, runner)


def prebuild(
    model: torch.nn.Module,
    example_inputs: Sequence[Any],
    cluster: ClusterSpec | str | os.PathLike[str] | None = None,
    objective: str = "latency",
    dynamic_shapes: Any = None,
    backends: Mapping[str, str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    *,
    pins: Mapping[str, str] | None = None,
    exclude: Sequence[str] = (),
    microbatches: int = 1,
    options: Any = None,
    cost_model: Any = None,
) -> Plan:
    """Capture, plan and compile every partition into the cache, loading none of them: the
    plan, which `compile(..., plan=...)` then builds from cache hits. `hetero serve` runs
    it in a child process, so compiling never competes with the server for the GIL."""
    graph = capture(model, example_inputs, dynamic_shapes)
    build = _Builder.of(
        graph, objective, backends, pins, exclude, microbatches, cost_model, cache_dir,
        example_inputs, options,
    )  # fmt: skip
    return build(resolve_cluster(cluster))[1]


class _Builder:
    """Plan a graph for a cluster and compile what the plan needs (cache hits for the rest).

    `hetero.compile` calls it once; the Ray executor calls it again, with the devices that
    are left, when some are gone for good.
    """

    @classmethod
    def of(
        cls, graph, objective, backends, pins, exclude, microbatches, cost_model, cache_dir,
        example_inputs, options,
    ) -> _Builder:  # fmt: skip
        plan_kwargs = dict(
            backends=backends,
            pins=pins,
            exclude=exclude,
            microbatches=microbatches,
            cost_model=cost_model,
        )
        root = Path(cache_dir) if cache_dir else default_cache_dir()
        return cls(graph, objective, plan_kwargs, root, example_inputs, options)

    def __init__(self, graph, objective, plan_kwargs, cache_dir, example_inputs, options) -> None:
        self.graph = graph
        self.objective = objective
        self.plan_kwargs = plan_kwargs
        self.cache_dir = cache_dir
        self.example_inputs = example_inputs
        self.options = options
        self._planned = False

    def __call__(self, cluster: ClusterSpec, plan: Plan | None = None):
        from hetero.partitioner.algorithms import plan as make_plan
        from hetero.runtime.build import compile_plan

        kwargs = self.plan_kwargs
        if self._planned:  # a re-plan: pins and exclusions of devices now gone lapse
            kwargs = {**kwargs, **_present(cluster, kwargs.get("pins"), kwargs.get("exclude"))}
        self._planned = True
        if plan is None:
            plan = make_plan(self.graph, cluster, self.objective, **kwargs)
        stages = compile_plan(
            self.graph,
            plan,
            cluster,
            self.cache_dir,
            example_inputs=self.example_inputs,
            options=self.options,
        )
        return stages, plan


def _present(cluster: ClusterSpec, pins: Any, exclude: Any) -> dict[str, Any]:
    def here(name: str) -> bool:
        try:
            cluster.device(name)
        except ConfigError:
            return False
        return True

    return {
        "pins": {k: d for k, d in (pins or {}).items() if here(d)} or None,
        "exclude": [d for d in (exclude or ()) if here(d)],
    }


def deploy(target: CompiledModel | str | os.PathLike[str], **kwargs: Any) -> Any:
    """A Ray actor handle serving `target` (a CompiledModel or a deploy config path)."""
    from hetero.interfaces.deploy import deploy as ray_deploy

    return ray_deploy(target, **kwargs)
