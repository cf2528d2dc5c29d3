"""The deploy config: one YAML file that names the model, the cluster and how to serve it.

```yaml
model: hetero.interfaces.models:tiny_gpt      # pkg.module:factory -> (module, example_inputs)
model_args: {batch: 1, seq: 32}            #   keyword arguments for the factory
# model: exported/gpt.pt2                  # or a file written by torch.export.save
# model: hf:gpt2                           # or a model in the local Hugging Face cache
#                                          #   (model_args: batch, seq, revision)
# weights: checkpoints/tuned.safetensors   # load these weights into the model (strict)
# model: {transformers: LlamaConfig, config: {num_hidden_layers: 80, ...}, device: meta,
#         inputs: {batch: 1, seq: 128}}    # or a transformers config; on `meta` no weights
#                                          # exist: `hetero plan` plans it, nothing compiles it
dtype: float32                             # cast weights and float inputs
dynamic: {idx: {1: {name: seq, min: 1, max: 128}}}
cluster: ../clusters/cpu-2core.yaml        # a file (relative to this one), local, auto, ray://host:10001
objective: latency                         # or throughput
constraints: {exclude: [box/npu], memory: {box/gpu0: 8 GiB}, pins: {blocks.0: box/cpu}}
backends: {gpu: triton, cpu: tvm, npu: tvm}   # named kinds are pinned: never measured
choose: measured                           # or fixed; each partition's backend by measurement
choose_budget: 600 s                       # extra compile + timing time the choice may spend
cache_dir: ~/.cache/hetero
serving: {host: 127.0.0.1, port: 50051, http_port: 8000, max_message_bytes: 4 MiB, queue_limit: 64, deadline: 30 s}
# task: generate                           # a causal LM: prefill + decode with a KV cache, tokens streamed
# generation: {max_length: 256, batch_size: 1, max_new_tokens: 32}
ray: {namespace: hetero, head_host: 127.0.0.1}   # head_host: where a head hetero starts listens
```

`load_config(path)` validates it; every error names the file and the key.
"""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hetero.backends.registry import default_registry
from hetero.cluster.reference import FILE, RAY, reference_kind, resolve_cluster
from hetero.cluster.schema import ByteCount, Duration, format_errors
from hetero.cluster.spec import ClusterSpec, read_yaml
from hetero.errors import ConfigError
from hetero.interfaces.modelfile import load_exported
from hetero.interfaces.modelref import load_factory
from hetero.interfaces.pretrained import PREFIX as HF_PREFIX
from hetero.interfaces.pretrained import load_hf, load_weights
from hetero.partitioner.decisions import (
    BackendAssignment,
    BackendChoice,
    Choose,
    FeedbackRounds,
    HostPrecision,
    Objective,
    Task,
)

_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
DTYPES = ("float32", "float16", "bfloat16")
# gRPC's own default receive limit is 4 MiB. hetero states it in the config instead of
# inheriting it silently: a deployment with big tensors raises it on purpose.
GRPC_DEFAULT_MESSAGE_BYTES = 4 * 2**20


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DimSpec(_Strict):
    """A dynamic dim: its name (dims with one name share a size) and its range."""

    name: str
    min: int | None = Field(None, ge=0)
    max: int | None = Field(None, ge=1)


class ServingOptions(_Strict):
    host: str = "127.0.0.1"  # loopback unless the config says otherwise (both ports)
    port: int = Field(50051, ge=0, le=65535)  # gRPC; 0 picks a free port
    # The Open Inference Protocol's HTTP/REST twin and /metrics; 0 picks a free port, null: none
    http_port: int | None = Field(8000, ge=0, le=65535)
    # Largest request or answer, both directions. gRPC's default receive limit is 4 MiB;
    # raise it here, on purpose, for big tensors (e.g. "64 MiB").
    max_message_bytes: ByteCount = GRPC_DEFAULT_MESSAGE_BYTES
    queue_limit: int = Field(64, ge=1)  # requests admitted at once; more get RESOURCE_EXHAUSTED
    deadline: Duration = 30.0  # seconds; applies when a client sends no deadline
    workers: int = Field(1, ge=1)  # model calls that run at the same time
    grace: Duration = 10.0  # seconds in-flight requests get to finish on shutdown
    # NaN and ±Inf in floating inputs are refused (INVALID_ARGUMENT) unless this is true,
    # for models that take them on purpose (additive -inf attention masks).
    allow_nonfinite: bool = False

    @field_validator("max_message_bytes")
    @classmethod
    def _size(cls, n: int) -> int:
        if n < 1024:
            raise ValueError(f"{n} bytes is too small for any request (use e.g. '4 MiB')")
        return n

    @field_validator("deadline", "grace")
    @classmethod
    def _time(cls, t: float) -> float:
        if t <= 0:
            raise ValueError("must be a positive time, e.g. '30 s'")
        return t


class RayOptions(_Strict):
    namespace: str = "hetero"  # other drivers find a named deployment here (ray.get_actor)
    num_cpus: float = Field(1.0, ge=0)  # reserved by the deployment actor
    num_gpus: float = Field(0.0, ge=0)
    python: str = "python"  # interpreter a submitted job runs on the cluster
    # Address a Ray head that hetero starts itself advertises. Its metrics endpoints have no
    # authentication and listen on this address: loopback unless you expose them on purpose.
    head_host: str = "127.0.0.1"


class GenerationOptions(_Strict):
    """`task: generate`: the static KV cache and the default request size."""

    max_length: int = Field(256, ge=3)  # cache positions: a prompt of 2+ and new tokens
    batch_size: int = Field(1, ge=1)  # sequences per request
    max_new_tokens: int = Field(32, ge=1)  # for a request that names no number
    # "model": host CPUs keep the model's mantissa; "fastest": a float16 LM's CPU layers may
    # run bfloat16 copies where that host reads them faster (logits further from the GPU's)
    host_precision: HostPrecision = HostPrecision.MODEL
    # with `feedback: true`: seconds of measured rounds after which the next is the last
    # (hetero.FeedbackRounds' budget_s); none: up to three rounds, however long
    feedback_budget: Duration | None = None


class Constraints(_Strict):
    exclude: list[str] = Field(default_factory=list)  # devices the plan must not use
    memory: dict[str, ByteCount] = Field(default_factory=dict)  # device -> bytes usable (a cap)
    pins: dict[str, str] = Field(default_factory=dict)  # module path or op name -> device


class TransformersModel(_Strict):
    """A transformers model built from its config class, on `device` ("meta": shapes only,
    weight bytes from shapes; a 70B model is planned on a laptop), with token ids of
    `inputs` shape as the example."""

    transformers: str = Field(pattern=r"^[A-Za-z_]\w*Config$")  # e.g. LlamaConfig
    config: dict[str, Any] = Field(default_factory=dict)  # the config's keyword arguments
    class_name: str | None = Field(None, alias="class")  # default: AutoModelForCausalLM
    device: Literal["meta", "cpu"] = "meta"
    inputs: dict[Literal["batch", "seq"], int] = Field(
        default_factory=lambda: {"batch": 1, "seq": 128}
    )

    def __str__(self) -> str:
        return f"transformers {self.class_name or self.transformers} ({self.device})"


class DeployConfig(_Strict):
    """A validated deploy config. Paths are absolute (resolved against the config's folder)."""

    model: str | TransformersModel
    model_args: dict[str, Any] = Field(default_factory=dict)
    weights: str | None = None  # a .safetensors file loaded into the model
    task: Task = Task.FORWARD
    generation: GenerationOptions | None = None  # task: generate (its defaults when absent)
    dtype: Literal["float32", "float16", "bfloat16"] | None = None
    dynamic: dict[str, dict[int, DimSpec]] = Field(default_factory=dict)
    cluster: str = "local"
    objective: Objective = Objective.LATENCY
    constraints: Constraints = Field(default_factory=Constraints)
    backends: dict[Literal["gpu", "cpu", "npu"], str] = Field(default_factory=dict)
    choose: Choose | None = None  # None: $HETERO_CHOOSE, else measured
    choose_budget: Duration | None = None  # None: BackendChoice's default
    cache_dir: str | None = None
    executor: Literal["auto", "local", "ray"] = "auto"
    # measured times correct the cost model and re-plan online (hetero.compile(feedback=True))
    feedback: bool = False
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    serving: ServingOptions = Field(default_factory=ServingOptions)
    ray: RayOptions = Field(default_factory=RayOptions)
    source: str = ""  # the file it was read from (set by load_config, used in messages)

    @field_validator("model")
    @classmethod
    def _model(cls, v: str | TransformersModel) -> str | TransformersModel:
        if not isinstance(v, str) or _IMPORT_PATH.match(v) or v.endswith(".pt2"):
            return v
        if v.startswith(HF_PREFIX) and len(v) > len(HF_PREFIX):
            return v
        if re.search(r"\.(pt|pth|bin|pkl|pickle|ckpt)$", v):
            raise ValueError(
                f"{v!r} is a pickle-based file, which can run code when loaded; hetero loads "
                "only .pt2 programs written by torch.export.save (weights stay data)"
            )
        raise ValueError(
            "expected an import path `pkg.module:factory`, a `.pt2` file or `hf:<model id>`; "
            f"got {v!r}"
        )

    @field_validator("weights")
    @classmethod
    def _weights(cls, v: str | None) -> str | None:
        if v is not None and not v.endswith(".safetensors"):
            raise ValueError(
                f"{v!r}: weights are read from .safetensors files only (a pickled checkpoint "
                "can run code when loaded)"
            )
        return v

    @field_validator("dynamic", mode="before")
    @classmethod
    def _dims(cls, v: Any) -> Any:
        # `{1: seq}` is short for `{1: {name: seq}}`.
        if isinstance(v, Mapping):
            return {
                k: ({d: ({"name": s} if isinstance(s, str) else s) for d, s in dims.items()})
                if isinstance(dims, Mapping)
                else dims
                for k, dims in v.items()
            }
        return v

    @field_validator("cluster")
    @classmethod
    def _cluster(cls, v: str) -> str:
        reference_kind(v)  # a ValueError saying what a cluster reference looks like
        return v

    @model_validator(mode="before")
    @classmethod
    def _generation_defaults(cls, data: Any) -> Any:
        generating = isinstance(data, Mapping) and str(data.get("task", "")) == "generate"
        if generating and data.get("generation") is None:
            return {**data, "generation": {}}
        return data

    @model_validator(mode="after")
    def _task(self) -> DeployConfig:
        if self.task is Task.GENERATE and self.dynamic:
            raise ValueError(
                "dynamic: a generator takes any prompt length up to generation.max_length "
                "without it; remove `dynamic`"
            )
        if self.task is not Task.GENERATE and self.generation is not None:
            raise ValueError("generation: applies to `task: generate` only; add it or remove this")
        if self.generation is not None and self.generation.feedback_budget is not None:
            if not self.feedback:
                raise ValueError(
                    "generation.feedback_budget bounds the measured rounds of `feedback: true`; "
                    "add `feedback: true` or remove the budget"
                )
            if not float(self.generation.feedback_budget) > 0:
                raise ValueError("generation.feedback_budget: give a duration above 0")
        return self

    @model_validator(mode="after")
    def _ranges(self) -> DeployConfig:
        for name, dim in ((n, d) for dims in self.dynamic.values() for n, d in dims.items()):
            if dim.min is not None and dim.max is not None and dim.min > dim.max:
                raise ValueError(f"dynamic dim {name} ({dim.name}): min {dim.min} > max {dim.max}")
        return self

    # ---- what the config points at -----------------------------------------------------------
    @property
    def is_ray(self) -> bool:
        """The cluster is a running Ray cluster (an address), not a file or this machine."""
        return reference_kind(self.cluster) == RAY

    @property
    def is_exported_file(self) -> bool:
        return isinstance(self.model, str) and self.model.endswith(".pt2")

    @property
    def deployment_name(self) -> str:
        if self.name:
            return self.name
        stem = Path(self.source).stem if self.source else "model"
        return re.sub(r"[^A-Za-z0-9_.-]", "-", stem) or "model"

    def where(self, key: str) -> str:
        return f"{self.source or '<config>'}: {key}"

    def cluster_spec(self) -> ClusterSpec:
        """The ClusterSpec the config names, less excluded devices and with memory caps."""
        if reference_kind(self.cluster) == FILE and not Path(self.cluster).is_file():
            raise ConfigError(
                f"{self.where('cluster')}: no cluster file {self.cluster} "
                "(paths are relative to the config's folder)"
            )
        spec = resolve_cluster(self.cluster, where=self.where("cluster"))
        try:
            if self.constraints.exclude:
                spec = spec.without(self.constraints.exclude)
            for device, cap in self.constraints.memory.items():
                spec = spec.with_device(device, memory=float(cap))
        except ConfigError as e:
            raise ConfigError(f"{self.where('constraints')}: {e}") from None
        for kind in self.backends:
            if not spec.of_kind(kind):
                have = ", ".join(dict.fromkeys(d.kind for d in spec.devices))
                raise ConfigError(
                    f"{self.where('backends')}.{kind}: cluster {spec.name} has no {kind} "
                    f"devices (it has {have}); remove the key, or name a cluster that has one"
                )
        return spec

    def load_model(self, *, weights: bool = True) -> LoadedModel:
        """Import the factory (or load the .pt2 file safely, or build the transformers
        model) and cast to `dtype`. weights=False accepts a model without weights (on the
        meta device), which only planning can use."""
        if self.is_exported_file:
            module, example = load_exported(self.model, where=self.where("model"))
            if self.weights is not None:
                raise ConfigError(
                    f"{self.where('weights')}: a .pt2 program carries its own weights"
                )
        elif isinstance(self.model, TransformersModel):
            module, example = _build_transformers(self)
        elif self.model.startswith(HF_PREFIX):
            module, example = load_hf(
                self.model, self.where("model"), self.where("model_args"), **self.model_args
            )
        else:
            module, example = load_factory(
                self.model, self.where("model"), self.where("model_args"), **self.model_args
            )
        if self.weights is not None and not self.is_exported_file:
            load_weights(module, self.weights, where=self.where("weights"))
        if self.dtype is not None:
            module, example = _cast(module, example, self.dtype)
        if weights and _on_meta(module):
            raise ConfigError(
                f"{self.where('model')}: {self.model} has no weights (it is built on the meta "
                "device). What to do: `hetero plan` plans it as it is; to compile or serve it, "
                "build it on a real device (device: cpu) or load its weights."
            )
        return LoadedModel(module, example, _dynamic_shapes(self, module, example))

    @property
    def backend_assignment(self) -> BackendAssignment:
        """The defaults overridden by `backends:` (names are checked against the registry
        where the plan is made)."""
        return BackendAssignment.parse(self.backends, where=self.where("backends"))

    @property
    def backend_choice(self) -> BackendChoice:
        """`choose:` and `choose_budget:` typed (unset: $HETERO_CHOOSE, the default budget)."""
        base = BackendChoice.parse(self.choose, where=self.where("choose"))
        if self.choose_budget is None:
            return base
        return BackendChoice(base.mode, float(self.choose_budget))

    def compile_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for hetero.compile besides the model and its inputs."""
        if self.task is Task.GENERATE and self.generation is not None:
            return {
                "task": Task.GENERATE,
                "max_length": self.generation.max_length,
                "batch_size": self.generation.batch_size,
                "host_precision": self.generation.host_precision,
                # overrides of generation's own defaults per device kind, as written
                "backends": dict(self.backends) or None,
                "cache_dir": self.cache_dir,
                "executor": self.executor,
                # measured rounds after the build (interfaces/generate.py), as hetero.compile
                "feedback": FeedbackRounds(budget_s=float(self.generation.feedback_budget))
                if self.feedback and self.generation.feedback_budget is not None
                else self.feedback,
            }
        return {
            "objective": self.objective,
            "backends": self.backend_assignment,
            "choose": self.backend_choice,
            "cache_dir": self.cache_dir,
            "executor": self.executor,
            "feedback": self.feedback,
        }


@dataclass(frozen=True)
class LoadedModel:
    module: Any  # torch.nn.Module
    example_inputs: tuple[Any, ...]
    dynamic_shapes: Any  # for torch.export, or None


def load_config(path: str | os.PathLike[str]) -> DeployConfig:
    """Read and validate a deploy config; relative paths resolve against its folder."""
    p = Path(path).expanduser()
    return config_from_dict(read_yaml(p, "the deploy config"), source=p)


def config_from_dict(data: Any, source: str | os.PathLike[str] = "<dict>") -> DeployConfig:
    src = Path(source)
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: a deploy config is a mapping with at least `model:`")
    if "source" in data:
        raise ConfigError(f"{src}: source: unknown key (check its spelling)")
    try:
        cfg = DeployConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(format_errors(str(src), "deploy config", e, DeployConfig)) from None
    # Names the registry lacks, and backends that do not compile for a kind (`cpu: triton`),
    # are refused here, before anything is planned.
    default_registry().check_assignment(
        cfg.backend_assignment, kinds=cfg.backends, where=f"{src}: backends"
    )
    base = src.parent if str(source) != "<dict>" else Path.cwd()
    update: dict[str, Any] = {"source": str(src)}
    if cfg.cluster.endswith((".yaml", ".yml")):
        update["cluster"] = str(_resolve(base, cfg.cluster))
        if not Path(update["cluster"]).is_file():
            raise ConfigError(
                f"{src}: cluster: no file {cfg.cluster} (looked for {update['cluster']}); "
                "paths are relative to the config's folder"
            )
    if cfg.is_exported_file:
        update["model"] = str(_resolve(base, cfg.model))
        if not Path(update["model"]).is_file():
            raise ConfigError(f"{src}: model: no file {cfg.model} (looked for {update['model']})")
    if cfg.weights is not None:
        update["weights"] = str(_resolve(base, cfg.weights))
        if not Path(update["weights"]).is_file():
            raise ConfigError(
                f"{src}: weights: no file {cfg.weights} (looked for {update['weights']})"
            )
    if cfg.cache_dir is not None:
        update["cache_dir"] = str(_resolve(base, cfg.cache_dir))
    return cfg.model_copy(update=update)


def _resolve(base: Path, path: str) -> Path:
    p = Path(os.path.expandvars(path)).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


# ---- model loading ------------------------------------------------------------------------------


def _build_transformers(cfg: DeployConfig) -> tuple[Any, tuple[Any, ...]]:
    spec = cfg.model
    try:
        import transformers  # optional (hetero[test]/[bench]); only this kind of model needs it
    except ImportError:
        raise ConfigError(
            f"{cfg.where('model.transformers')}: transformers is not installed here "
            "(pip install transformers)"
        ) from None
    config_cls = getattr(transformers, spec.transformers, None)
    if config_cls is None:
        raise ConfigError(
            f"{cfg.where('model.transformers')}: transformers has no {spec.transformers}"
        )
    try:
        config = config_cls(**spec.config)
    except (TypeError, ValueError) as e:
        raise ConfigError(
            f"{cfg.where('model.config')}: {spec.transformers} rejected it: {e}"
        ) from None
    if hasattr(config, "use_cache"):
        config.use_cache = False  # a cache is state torch.export cannot return
    model_cls = getattr(transformers, spec.class_name or "AutoModelForCausalLM", None)
    if model_cls is None:
        raise ConfigError(f"{cfg.where('model.class')}: transformers has no {spec.class_name}")
    try:
        with torch.device(spec.device):
            model = (model_cls(config) if spec.class_name else model_cls.from_config(config)).eval()
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{cfg.where('model')}: cannot build {spec}: {e}") from None
    shape = (spec.inputs.get("batch", 1), spec.inputs.get("seq", 128))
    ids = torch.zeros(shape, dtype=torch.long, device=spec.device)
    return model, (ids,)


def _on_meta(module: Any) -> bool:
    if not isinstance(module, torch.nn.Module):
        return False
    return any(t.is_meta for t in (*module.parameters(), *module.buffers()))


def _cast(module: Any, example: tuple[Any, ...], dtype: str) -> tuple[Any, tuple[Any, ...]]:
    tdtype = getattr(torch, dtype)
    module = module.to(tdtype)
    example = tuple(
        x.to(tdtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
        for x in example
    )
    return module, example


def _dynamic_shapes(cfg: DeployConfig, module: Any, example: tuple[Any, ...]) -> Any:
    """torch.export dynamic_shapes keyed by forward's parameter names; None when static."""
    if not cfg.dynamic:
        return None

    forward = getattr(module, "forward", module)
    try:
        names = [
            p.name
            for p in inspect.signature(forward).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ][: len(example)]
    except (TypeError, ValueError):
        names = [f"arg{i}" for i in range(len(example))]
    unknown = sorted(set(cfg.dynamic) - set(names))
    if unknown:
        raise ConfigError(
            f"{cfg.where('dynamic')}: no input named {', '.join(unknown)}; the model's inputs "
            f"are {', '.join(names)}"
        )
    dims: dict[str, Any] = {}
    spec: dict[str, Any] = {}
    for name, x in zip(names, example, strict=False):
        entries = cfg.dynamic.get(name)
        if not entries:
            spec[name] = None
            continue
        rank = x.dim() if isinstance(x, torch.Tensor) else 0
        out = {}
        for d, dim in entries.items():
            if not 0 <= d < rank:
                raise ConfigError(
                    f"{cfg.where(f'dynamic.{name}.{d}')}: {name} has {rank} dims; dim {d} does not exist"
                )
            if dim.name not in dims:
                dims[dim.name] = torch.export.Dim(dim.name, min=dim.min, max=dim.max)
            out[d] = dims[dim.name]
        spec[name] = out
    return spec
