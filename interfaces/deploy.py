"""Deploy a compiled model as a Ray actor other Ray programs can call.

    handle = hetero.deploy("configs/deploy/cpu-2core.yaml", name="gpt", detached=True)
    out = ray.get(handle.infer.remote(x))
    # from any other driver on the cluster:
    h = ray.get_actor("gpt", namespace="hetero")

Also the shared steps of the ways in: `build_compiled(cfg)` (config -> CompiledModel) and
`init_ray(address)` (connect, or start a private head that is safe by default).
"""

from __future__ import annotations

import inspect
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetero.errors import CompileError, ConfigError, HeteroError
from hetero.interfaces.config import DeployConfig, load_config

log = logging.getLogger(__name__)

NAMESPACE = "hetero"
DEPLOYMENT_RESTARTS = 3
LOOPBACK = "127.0.0.1"
_LOOPBACKS = ("127.0.0.1", "localhost")
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's "node on loopback" switch
_MIN_RAY_TOKEN_AUTH = (2, 52)


def build_compiled(
    cfg: DeployConfig,
    progress: Callable[[str], None] | None = None,
    loaded: Any = None,
    *,
    cluster: Any = None,
    plan: Any = None,
) -> Any:
    """Load the config's model (unless `loaded` is given), read its cluster (unless given),
    plan (unless `plan` is given) and compile: a CompiledModel."""
    say = progress or (lambda _msg: None)
    try:
        from hetero.interfaces.api import compile as hetero_compile
    except ImportError as e:  # the compile pipeline is an optional part of an install
        raise HeteroError(f"hetero's compile API is not available here: {e}") from None
    if loaded is None:
        say(f"loading the model {cfg.model}")
        loaded = cfg.load_model()
    if cluster is None:
        say(f"reading the cluster {cfg.cluster}")
        cluster = cfg.cluster_spec()
    kwargs = _compile_kwargs(cfg, hetero_compile)
    say(f"planning for {cluster.name} ({cfg.objective}) and compiling the partitions")
    return hetero_compile(
        loaded.module,
        loaded.example_inputs,
        cluster=cluster,
        dynamic_shapes=loaded.dynamic_shapes,
        plan=plan,
        **kwargs,
    )


def _compile_kwargs(cfg: DeployConfig, fn: Callable[..., Any]) -> dict[str, Any]:
    kwargs = cfg.compile_kwargs()
    if cfg.constraints.pins:
        if "pins" not in inspect.signature(fn).parameters:
            raise ConfigError(
                f"{cfg.where('constraints.pins')}: this version of hetero.compile takes no pins; "
                "remove them or use `constraints.exclude` / `constraints.memory`"
            )
        kwargs["pins"] = dict(cfg.constraints.pins)
    return kwargs


def prebuild(cfg: DeployConfig, cluster: Any, timeout: float | None = None) -> Any:
    """Plan and compile every partition in a child process; the plan.

    Compiling is CPU-bound Python (torch.export, TVM's passes) and library loads that hold
    the GIL for up to 1.6 s here; in the serving process it starved the health service (1 s
    probes timed out). The child fills the artifact cache; the server then builds the same
    plan from cache hits. Errors are the child's (CompileError names the partition).
    """
    import multiprocessing

    from hetero.partitioner.plan import Plan

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


def _prebuild_child(cfg: DeployConfig, cluster: Any, send: Any) -> None:
    from hetero.interfaces.api import prebuild as api_prebuild

    try:
        loaded = cfg.load_model()
        kwargs = _compile_kwargs(cfg, api_prebuild)
        kwargs.pop("executor", None)
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
    from hetero.backends.registry import default_registry

    registry = default_registry()
    names = set(cfg.backends.values()) or {"tvm"}  # TVM is the default for CPUs and NPUs
    for name in sorted(names):
        try:
            registry.get(name).available()
        except Exception as e:  # a missing backend is reported when a partition needs it
            log.debug("could not preload backend %s: %s", name, e)
    if "tvm" in names:
        try:
            import tvm.runtime.vm  # noqa: F401

            from hetero.backends.tvm.dispatch import register_kernels

            register_kernels()
        except ImportError:
            pass


# ---- Ray ------------------------------------------------------------------------------------------


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def safe_head_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Ray head hetero starts: token authentication on (Ray >= 2.52).

    An explicit RAY_AUTH_MODE in the environment is respected (and logged when it turns
    authentication off).
    """
    env = dict(os.environ if env is None else env)
    mode = env.get("RAY_AUTH_MODE")
    if mode is None:
        env["RAY_AUTH_MODE"] = "token"
    elif mode.lower() != "token":
        log.warning(
            "RAY_AUTH_MODE=%s: the Ray head hetero starts runs WITHOUT token authentication; "
            "anyone who reaches its ports can run code on it",
            mode,
        )
    return env


def init_ray(
    address: str | None = None,
    namespace: str = NAMESPACE,
    resources: dict[str, float] | None = None,
    host: str = LOOPBACK,
) -> None:
    """Connect to the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379").

    Without an address, start a private head for this process (never joining a cluster
    some other process started), with no dashboard (so no job API) and with Ray's token
    authentication turned on: every RPC to it must carry the token. The head advertises
    `host`, 127.0.0.1 unless told otherwise: its metrics exporters (which Ray binds to
    0.0.0.0 without authentication for any other address) then listen on loopback alone,
    and no other node can join it. Ray itself would replace a loopback address with the
    machine's routable one (services.resolve_ip_for_localhost); `_pin_to_loopback` uses
    the switch Ray has for that on macOS and Windows.

    Call it from the main thread: Ray ties the head's processes to the thread that starts
    them (they die when it ends).
    """
    import sys

    local = address in (None, "", "local")
    if local and "ray" not in sys.modules:
        os.environ.update(safe_head_env())  # read when Ray loads its config
        if host in _LOOPBACKS:
            _pin_to_loopback()
    import ray

    if ray.is_initialized():
        return
    if local:
        if _version(ray.__version__) < _MIN_RAY_TOKEN_AUTH:
            log.warning(
                "Ray %s has no token authentication (needs >= 2.52): anyone who reaches "
                "this machine's Ray ports can run code on it",
                ray.__version__,
            )
        os.environ.update(safe_head_env())
        _refresh_ray_config()
        where: dict[str, Any] = {}
        if host in _LOOPBACKS:
            _pin_to_loopback()
        else:
            log.warning(
                "the Ray head listens on %s: its metrics endpoints have no authentication", host
            )
            where["_node_ip_address"] = host
        ray.init(
            address="local",  # a new head, never a cluster some other process started
            namespace=namespace,
            include_dashboard=False,
            log_to_driver=False,
            resources=resources or None,  # e.g. {"NPU": 1} for emulated NPUs on this host
            **where,
        )
    else:
        ray.init(address=address, namespace=namespace, log_to_driver=False)


def ensure_ray(cluster: Any, host: str = LOOPBACK) -> None:
    """Start a private head for `cluster` unless Ray runs in this process already: emulated
    NPUs of this host become the custom resource NPU workers ask for."""
    import ray

    if ray.is_initialized():
        return
    npus = sum(1 for d in cluster.devices if d.kind == "npu")
    init_ray(resources={"NPU": float(npus)} if npus else None, host=host)


def needs_ray(cfg: DeployConfig) -> bool:
    """Whether the config's model runs on Ray (so this process must start or join it)."""
    if cfg.is_ray or cfg.executor == "ray":
        return True
    return cfg.executor == "auto" and len(cfg.cluster_spec().hosts) > 1


def _pin_to_loopback() -> None:
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    try:  # a Ray imported already read the variable: set what it read
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray version: the variable is enough
        pass


def _refresh_ray_config() -> None:
    """Make an already imported Ray see RAY_AUTH_MODE (Ray reads it once, on import)."""
    try:
        from ray._raylet import Config

        Config.initialize("")
    except (ImportError, AttributeError, TypeError):  # other Ray versions: env read at init
        pass


@dataclass(frozen=True)
class Recipe:
    """What it takes to rebuild a CompiledModel in another process: the captured program
    (torch.export.save bytes), example inputs, cluster and choices. A CompiledModel holds
    loaded kernels that do not pickle; the actor rebuilds from this (artifacts come from
    the content-hashed cache when it shares the machine)."""

    program: bytes
    example_inputs: tuple[Any, ...]
    cluster: Any  # ClusterSpec
    objective: str
    backends: dict[str, str]

    @classmethod
    def from_compiled(cls, cm: Any) -> Recipe:
        import io

        import torch

        buf = io.BytesIO()
        torch.export.save(cm.graph.program, buf)
        example = tuple(
            torch.zeros(meta.hint, dtype=getattr(torch, meta.dtype))
            for meta in cm.graph.inputs.values()
        )
        backends = {cm.cluster.device(p.device).kind: p.backend for p in cm.plan.partitions}
        return cls(buf.getvalue(), example, cm.cluster, cm.plan.objective, backends)

    def build(self) -> Any:
        import io

        import torch

        from hetero.interfaces.api import compile as hetero_compile

        # Bytes this process's own caller wrote with torch.export.save, never a user file.
        program = torch.export.load(io.BytesIO(self.program))
        # A plain GraphModule: the one ExportedProgram.module() returns refuses .eval().
        gm = program.module()
        module = torch.fx.GraphModule(gm, gm.graph)
        return hetero_compile(
            module,
            self.example_inputs,
            cluster=self.cluster,
            objective=self.objective,
            backends=self.backends,
        )


def _shippable(cm: Any) -> Any:
    """`cm` itself when it pickles, else a Recipe the actor rebuilds it from."""
    from ray import cloudpickle

    try:
        cloudpickle.dumps(cm)
    except Exception:  # loaded kernels (TVM modules, ...) do not pickle
        return Recipe.from_compiled(cm)
    return cm


class Deployment:
    """The actor behind `hetero.deploy`: one compiled model, callable from any Ray driver.

    Methods: infer(*inputs) -> what the model returns; run_flat({name: tensor}) ->
    {name: tensor}; metas(); ready(); info(); serve(host, port) -> gRPC address; shutdown().
    """

    def __init__(self, source: Any, name: str = "") -> None:
        from hetero.interfaces.serving.servable import ModelServable

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
        import torch

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

    def info(self) -> dict[str, Any]:
        import ray

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

    def serve(self, host: str | None = None, port: int | None = None) -> str:
        """Start the gRPC endpoint inside the actor (on its node); returns host:port."""
        from hetero.interfaces.config import ServingOptions
        from hetero.interfaces.serving import HeteroServer, ServerOptions

        if self.server is None:
            serving = self.config.serving if self.config is not None else ServingOptions()
            options = ServerOptions.from_config(serving, host=host, port=port)
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
    import ray

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
    import ray

    try:
        return ray.get_actor(name, namespace=namespace)
    except ValueError:
        raise HeteroError(
            f"no deployment named {name!r} in Ray namespace {namespace!r}; `hetero status` "
            "lists the running ones"
        ) from None


def stop(name: str, namespace: str = NAMESPACE, timeout: float = 30.0) -> None:
    """Shut a named deployment down (drains its gRPC endpoint) and end its actor."""
    import ray

    handle = find(name, namespace)
    try:
        ray.get(handle.shutdown.remote(), timeout=timeout)
    except Exception as e:  # an actor that already failed is killed all the same
        log.warning("deployment %s did not shut down cleanly: %s", name, e)
    ray.kill(handle, no_restart=True)


def list_deployments(namespace: str = NAMESPACE, timeout: float = 5.0) -> list[dict[str, Any]]:
    """Named deployments in `namespace`, each with its readiness and info (best effort)."""
    import ray

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
