"""Deploy a compiled model as a Ray actor other Ray programs can call.

    handle = hetero.deploy("configs/deploy/cpu-2core.yaml", name="gpt", detached=True)
    out = ray.get(handle.infer.remote(x))
    # from any other driver on the cluster:
    h = ray.get_actor("gpt", namespace="hetero")

Also the shared steps of the ways in: `build_compiled(cfg)` (config -> CompiledModel),
`prebuild(cfg, cluster)` (plan and fill the cache in a child process, for `hetero serve`),
`preload_backends(cfg)`, and `ensure_ray(cluster)` / `needs_ray(cfg)`. Ray start-up itself
is `hetero.cluster.connect.init_ray` (connect, or start a private head that is safe by
default).
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.backends.tvm.kernels import register_kernels
from hetero.cluster.connect import LOOPBACK, NAMESPACE, init_ray
from hetero.cluster.devices import NPU_RESOURCE
from hetero.cluster.spec import ClusterSpec
from hetero.errors import CompileError, HeteroError
from hetero.interfaces.api import CompiledModel, CompileSettings
from hetero.interfaces.api import compile as hetero_compile
from hetero.interfaces.api import prebuild as api_prebuild
from hetero.interfaces.config import DeployConfig, ServingOptions, load_config
from hetero.interfaces.serving.servable import ModelServable
from hetero.partitioner.decisions import ExecutorKind
from hetero.partitioner.graph import from_exported
from hetero.partitioner.plan import Plan

log = logging.getLogger(__name__)

DEPLOYMENT_RESTARTS = 3


def build_compiled(
    cfg: DeployConfig,
    progress: Callable[[str], None] | None = None,
    loaded: Any = None,
    *,
    cluster: ClusterSpec | None = None,
    plan: Plan | None = None,
    report: Callable[[str, int, int], None] | None = None,
) -> CompiledModel:
    """Load the config's model (unless `loaded` is given), read its cluster (unless given),
    plan (unless `plan` is given) and compile: a CompiledModel. `report(what, done, total)`
    hears of each partition compiled."""
    say = progress or (lambda _msg: None)
    if loaded is None:
        say(f"loading the model {cfg.model}")
        loaded = cfg.load_model()
    if cluster is None:
        say(f"reading the cluster {cfg.cluster}")
        cluster = cfg.cluster_spec()
    kwargs = _compile_kwargs(cfg)
    say(f"planning for {cluster.name} ({cfg.objective}) and compiling the partitions")
    return hetero_compile(
        loaded.module,
        loaded.example_inputs,
        cluster=cluster,
        dynamic_shapes=loaded.dynamic_shapes,
        plan=plan,
        progress=report,
        **kwargs,
    )


def _compile_kwargs(cfg: DeployConfig) -> dict[str, Any]:
    kwargs = cfg.compile_kwargs()
    if cfg.constraints.pins:
        kwargs["pins"] = dict(cfg.constraints.pins)
    return kwargs


def prebuild(cfg: DeployConfig, cluster: ClusterSpec, timeout: float | None = None) -> Plan:
    """Plan and compile every partition in a child process; the plan.

    Compiling is CPU-bound Python (torch.export, TVM's passes) and library loads that hold
    the GIL for up to 1.6 s here; in the serving process it starved the health service (1 s
    probes timed out). The child fills the artifact cache; the server then builds the same
    plan from cache hits. Errors are the child's (CompileError names the partition).
    """
    ctx = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    receive, send = ctx.Pipe(duplex=False)
    child = ctx.Process(target=_prebuild_child, args=(cfg, cluster, send), daemon=True)
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise CompileError(f"compiling {cfg.model} took longer than {timeout:g} s")
        ok, value = receive.recv()
    except EOFError:
        child.join(5)
        raise CompileError(
            f"the process compiling {cfg.model} died (exit code {child.exitcode}) before it "
            "answered; run `hetero compile` on the config to see why"
        ) from None
    finally:
        receive.close()
        if child.is_alive():
            child.join(10)
        if child.is_alive():
            child.kill()
    if not ok:
        raise value
    return Plan.from_json(value)


def _prebuild_child(cfg: DeployConfig, cluster: ClusterSpec, send: Any) -> None:
    try:
        loaded = cfg.load_model()
        kwargs = _compile_kwargs(cfg)
        # how the model runs, not what compiles: the server's own build applies them
        kwargs.pop("executor", None)
        kwargs.pop("feedback", None)
        plan = api_prebuild(
            loaded.module,
            loaded.example_inputs,
            cluster=cluster,
            dynamic_shapes=loaded.dynamic_shapes,
            **kwargs,
        )
        send.send((True, plan.to_json()))
    except Exception as e:  # reported in the parent, which raises it
        error = e if isinstance(e, HeteroError) else CompileError(f"{type(e).__name__}: {e}")
        send.send((False, error))
    finally:
        send.close()


def preload_backends(cfg: DeployConfig) -> None:
    """Import the runtimes of the backends the config may use, in the calling thread.

    Importing TVM maps its libraries while holding the GIL (1.6 s here); done by the thread
    that loads the model, it stalls every other thread of a live server.
    """
    registry = default_registry()
    names = set(cfg.backends.values()) or {"tvm"}  # TVM is the default for CPUs and NPUs
    for name in sorted(names):
        try:
            registry.get(name).available()
        except Exception as e:  # a missing backend is reported when a partition needs it
            log.debug("could not preload backend %s: %s", name, e)
    if "tvm" in names:
        try:
            import tvm.runtime.vm  # noqa: F401  # optional (hetero[tvm]): its runtime now

            register_kernels()
        except ImportError:
            pass


# ---- Ray ------------------------------------------------------------------------------------------


def ensure_ray(cluster: ClusterSpec, host: str = LOOPBACK) -> None:
    """Start a private head for `cluster` (cluster/connect.py's init_ray, advertising `host`)
    unless Ray runs in this process already: emulated NPUs of this host become the custom
    resource NPU workers ask for. Call it from the main thread (see init_ray)."""
    import ray  # optional (hetero[ray])

    if ray.is_initialized():
        return
    npus = sum(1 for d in cluster.devices if d.kind == "npu")
    init_ray(resources={NPU_RESOURCE: float(npus)} if npus else None, host=host)


def needs_ray(cfg: DeployConfig) -> bool:
    """Whether the config's model runs on Ray (so this process must start or join it)."""
    if cfg.is_ray:
        return True
    return ExecutorKind.parse(cfg.executor, cfg.cluster_spec()) is ExecutorKind.RAY


@dataclass(frozen=True)
class Recipe:
    """What it takes to rebuild a CompiledModel in another process without planning again:
    the captured program (torch.export.save bytes; its node names are the ones the plan
    names), example inputs, the cluster, the Plan itself and the settings and backend
    registry it was made with (a re-plan after a device is lost uses them again). A
    CompiledModel holds loaded kernels that do not pickle; the actor rebuilds from this
    (artifacts come from the content-hashed cache when it shares the machine)."""

    program: bytes
    model_name: str
    example_inputs: tuple[Any, ...]
    cluster: ClusterSpec
    plan: Plan
    settings: CompileSettings
    registry: BackendRegistry | None = None

    @classmethod
    def from_compiled(cls, cm: CompiledModel) -> Recipe:
        if cm.settings is None:
            raise HeteroError(
                "this CompiledModel was assembled by hand, not by hetero.compile: it records "
                "no settings to rebuild it with. Deploy a config, or a hetero.compile result."
            )
        buf = io.BytesIO()
        torch.export.save(cm.graph.program, buf)
        example = tuple(
            torch.zeros(meta.hint, dtype=getattr(torch, meta.dtype))
            for meta in cm.graph.inputs.values()
        )
        return cls(
            buf.getvalue(),
            cm.graph.model_name,
            example,
            cm.cluster,
            cm._plan,
            cm.settings,
            cm.registry,
        )

    def build(self) -> CompiledModel:
        # Bytes this process's own caller wrote with torch.export.save, never a user file.
        program = torch.export.load(io.BytesIO(self.program))
        graph = from_exported(program, model_name=self.model_name)
        s = self.settings
        return hetero_compile(
            graph.program.module(),  # not captured again: `graph` is the one planned
            self.example_inputs,
            cluster=self.cluster,
            objective=s.objective,
            backends=s.backends,
            cache_dir=s.cache_dir,
            pins=s.pins,
            exclude=s.exclude,
            microbatches=s.microbatches,
            options=s.options,
            cost_model=s.cost_model,
            graph=graph,
            plan=self.plan,
            registry=self.registry,
            feedback=s.feedback or False,
            choose=s.choose,
        )


def _shippable(cm: Any) -> Any:
    """`cm` itself when it pickles, else a Recipe the actor rebuilds it from."""
    from ray import cloudpickle  # optional (hetero[ray]): loaded on first use

    try:
        cloudpickle.dumps(cm)
    except Exception:  # loaded kernels (TVM modules, ...) do not pickle
        return Recipe.from_compiled(cm)
    return cm


class Deployment:
    """The actor behind `hetero.deploy`: one compiled model, callable from any Ray driver.

    Methods: infer(*inputs) -> what the model returns; run_flat({name: tensor}) ->
    {name: tensor}; metas(); ready(); info(); run_log() -> what it measured, as a dict
    (`hetero calibrate --from-runs NAME` folds it); serve(host, port) -> gRPC address;
    shutdown().
    """

    def __init__(self, source: Any, name: str = "") -> None:
        self.name = name
        self.config = source if isinstance(source, DeployConfig) else None
        if self.config is not None:
            self.cm = build_compiled(self.config)
        elif isinstance(source, Recipe):
            self.cm = source.build()
        else:
            self.cm = source
        self.servable = ModelServable(self.cm, name=name)
        self.server: Any = None
        self.started = time.time()

    def infer(self, *inputs: Any) -> Any:
        with torch.inference_mode():
            return self.cm(*inputs)

    def run_flat(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.servable.run_flat(inputs)

    def metas(self) -> tuple[dict, dict]:
        return dict(self.servable.input_metas), dict(self.servable.output_metas)

    def contract(self) -> Any:
        """What a request may hold (interfaces/validation.py); infer and run_flat check it."""
        return self.servable.contract

    def ready(self) -> bool:
        return self.servable.ready()

    def accepts(self) -> bool:
        return self.servable.accepts()

    def run_log(self) -> dict[str, Any]:
        """The run records of what this deployment measured (cluster/runs.py, as JSON data)."""
        return self.cm.run_log().to_dict()

    def info(self) -> dict[str, Any]:
        import ray  # optional (hetero[ray]): loaded on first use

        info = self.servable.info()
        info.update(
            name=self.name,
            node=ray.get_runtime_context().get_node_id(),
            grpc=self.server.address if self.server is not None else "",
            uptime_s=time.time() - self.started,
            inputs={n: str(m) for n, m in self.servable.input_metas.items()},
            outputs={n: str(m) for n, m in self.servable.output_metas.items()},
        )
        return info

    def serve(
        self, host: str | None = None, port: int | None = None, http_port: int | None = None
    ) -> str:
        """Start the endpoints inside the actor (on its node): gRPC, and HTTP unless the
        config's serving.http_port is null; returns the gRPC host:port."""
        # gRPC is optional (hetero[serve]) and only this method needs it
        from hetero.interfaces.serving.server import HeteroServer, ServerOptions

        if self.server is None:
            serving = self.config.serving if self.config is not None else ServingOptions()
            options = ServerOptions.from_config(serving, host=host, port=port, http_port=http_port)
            self.server = HeteroServer(_Borrowed(self.servable), options)
            self.server.start()
        return self.server.address

    def shutdown(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
        self.cm.shutdown()


class _Borrowed:
    """The actor's servable lent to its gRPC server: the server's shutdown leaves the model up."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.input_metas = inner.input_metas
        self.output_metas = inner.output_metas
        self.contract = inner.contract

    def run_flat(self, inputs: dict[str, Any]) -> dict[str, Any]:
        return self.inner.run_flat(inputs)

    def ready(self) -> bool:
        return self.inner.ready()

    def accepts(self) -> bool:
        return self.inner.accepts()

    def info(self) -> dict[str, Any]:
        return self.inner.info()


def deploy(
    cm_or_config: Any,
    name: str | None = None,
    detached: bool = False,
    *,
    namespace: str | None = None,
    num_cpus: float | None = None,
    num_gpus: float | None = None,
) -> Any:
    """Start a deployment actor and return its handle: `ray.get(h.infer.remote(x))`.

    `cm_or_config` is a CompiledModel (shipped to the actor), a deploy config path or a
    DeployConfig (compiled inside the actor, on the cluster). A `name` makes it findable
    with `ray.get_actor(name, namespace="hetero")`; `detached=True` keeps it alive after
    this driver exits (`hetero stop NAME` ends it).
    """
    import ray  # optional (hetero[ray]): loaded on first use

    cfg: DeployConfig | None = None
    if isinstance(cm_or_config, str | os.PathLike):
        cfg = load_config(Path(cm_or_config))
    elif isinstance(cm_or_config, DeployConfig):
        cfg = cm_or_config
    if cfg is None and not hasattr(cm_or_config, "run_flat"):
        raise HeteroError(
            f"hetero.deploy takes a CompiledModel, a DeployConfig or a config path; "
            f"got {type(cm_or_config).__name__}"
        )
    name = name or (cfg.name if cfg is not None else None)
    if detached and not name:
        raise HeteroError("a detached deployment needs a name (other drivers find it by name)")
    source: Any = cfg if cfg is not None else _shippable(cm_or_config)
    if not ray.is_initialized():
        init_ray(cfg.cluster if cfg is not None and cfg.is_ray else None)
    ray_opts = cfg.ray if cfg is not None else None
    options: dict[str, Any] = {
        "num_cpus": num_cpus if num_cpus is not None else (ray_opts.num_cpus if ray_opts else 1.0),
        "num_gpus": num_gpus if num_gpus is not None else (ray_opts.num_gpus if ray_opts else 0.0),
        # ready()/info() answer while a long infer runs
        "max_concurrency": 4,
        # A crash of the actor's process (which no input should cause: inputs are
        # validated) restarts it instead of ending a detached deployment for good.
        "max_restarts": DEPLOYMENT_RESTARTS,
    }
    if name:
        options["name"] = name
        options["namespace"] = namespace or (ray_opts.namespace if ray_opts else NAMESPACE)
    if detached:
        options["lifetime"] = "detached"
    actor_cls = ray.remote(Deployment)
    try:
        return actor_cls.options(**options).remote(source, name or "")
    except ValueError as e:  # Ray's answer to a taken name
        raise HeteroError(
            f"cannot start deployment {name!r} in namespace {options.get('namespace')!r}: {e}. "
            f"`hetero stop {name}` ends the running one, or pick another name."
        ) from None


def find(name: str, namespace: str = NAMESPACE) -> Any:
    """The handle of a named deployment (from any driver connected to the cluster)."""
    import ray  # optional (hetero[ray]): loaded on first use

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise HeteroError(
            f"no deployment named {name!r} in Ray namespace {namespace!r}; `hetero status` "
            "lists the running ones"
        ) from None


def stop(name: str, namespace: str = NAMESPACE, timeout: float = 30.0) -> None:
    """Shut a named deployment down (drains its gRPC endpoint) and end its actor."""
    import ray  # optional (hetero[ray]): loaded on first use

    handle = find(name, namespace)
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout)
    except Exception as e:  # an actor that already failed is killed all the same
        log.warning("deployment %s did not shut down cleanly: %s", name, e)
    ray.kill(handle, no_restart=True)
    # ray.kill only asks the GCS to end the actor; its name stays registered until the GCS
    # sees it dead. Returning before then let `find` (or a redeploy under the same name)
    # still see the stopped deployment.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ray.get_actor(name, namespace=namespace)
        except ValueError:
            return
        time.sleep(0.05)
    raise HeteroError(
        f"deployment {name!r} was killed but Ray still lists its name after {timeout:.0f} s; "
        "`ray list actors` shows its state"
    )


def list_deployments(namespace: str = NAMESPACE, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Named deployments in `namespace`, each with its readiness and info (best effort)."""
    import ray  # optional (hetero[ray]): loaded on first use

    rows = []
    for entry in ray.util.list_named_actors(all_namespaces=True):
        if entry.get("namespace") != namespace:
            continue
        row: dict[str, Any] = {"name": entry["name"], "ready": False, "state": "unreachable"}
        try:
            handle = ray.get_actor(entry["name"], namespace=namespace)
            info = ray.get(handle.info.remote(), timeout=timeout)
            row.update(info)
            row["ready"] = bool(ray.get(handle.ready.remote(), timeout=timeout))
        except Exception as e:  # not a hetero deployment, still loading, or dead
            row["error"] = str(e).splitlines()[0][:200]
        rows.append(row)
    return rows
