"""The decisions a person makes about a plan, typed once at the edge and passed down.

`Objective` (what the plan minimises) and `BackendAssignment` (which backend compiles each
device kind's partitions) are parsed where they enter hetero (`hetero.plan`,
`hetero.compile`, the deploy config, the CLI); everything below takes these types and
never reads a string again.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hetero.cluster.spec import DEVICE_KINDS, DeviceSpec
from hetero.errors import ConfigError


class Objective(str, enum.Enum):
    """What a plan minimises. A `str` so that JSON, YAML and messages show its value."""

    LATENCY = "latency"  # one request's time: partitions run one after another
    THROUGHPUT = "throughput"  # time per microbatch of a pipeline at steady state

    def __str__(self) -> str:  # f-strings show "latency", not "Objective.LATENCY"
        return self.value

    @property
    def pipelined(self) -> bool:
        """The batch is cut into microbatches that flow through the stages as a pipeline."""
        return self is Objective.THROUGHPUT

    @classmethod
    def parse(cls, value: Objective | str, where: str = "objective") -> Objective:
        """The objective `value` names; a ConfigError listing the known ones otherwise."""
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(o.value for o in cls)
            raise ConfigError(f"{where}: {value!r} is not an objective; known: {known}") from None


class Task(str, enum.Enum):
    """What a compiled model is for."""

    FORWARD = "forward"  # one stateless forward per request (`cm(*inputs)`)
    GENERATE = "generate"  # a causal LM with a KV cache: prefill, then decode per token

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Task | str, where: str = "task") -> Task:
        if isinstance(value, cls):
            return value
        try:
            return cls(value)
        except ValueError:
            known = ", ".join(t.value for t in cls)
            raise ConfigError(f"{where}: {value!r} is not a task; known: {known}") from None


# (kind, backend), sorted by kind. gpu: our own Triton fusion; cpu and npu: TVM (an NPU compiles for the host and is emulated)
DEFAULT_BACKENDS: tuple[tuple[str, str], ...] = (("cpu", "tvm"), ("gpu", "triton"), ("npu", "tvm"))
FALLBACK_BACKEND = "eager"  # runs every op on every device; used where the asked one cannot


@dataclass(frozen=True)
class BackendAssignment:
    """Which backend compiles the partitions of each device kind (`by_kind`, kind -> name,
    sorted; a kind not listed runs `FALLBACK_BACKEND`)."""

    by_kind: tuple[tuple[str, str], ...] = DEFAULT_BACKENDS

    @classmethod
    def parse(
        cls,
        value: BackendAssignment | Mapping[str, str] | None,
        *,
        known: Iterable[str] | None = None,
        where: str = "backends",
    ) -> BackendAssignment:
        """The defaults overridden by `value` (device kind -> backend name, e.g. a deploy
        config's `backends:`). A kind that is not one, or a name not in `known` (the
        registry's names), is a ConfigError listing the known ones."""
        if isinstance(value, BackendAssignment):
            out = value
        else:
            if value is not None and not isinstance(value, Mapping):
                raise ConfigError(
                    f"{where}: expected a mapping of device kind to backend name "
                    f"(e.g. {{'gpu': 'triton', 'cpu': 'tvm'}}); got {type(value).__name__}"
                )
            given = dict(value or {})
            bad = sorted(k for k in given if k not in DEVICE_KINDS)
            if bad:
                raise ConfigError(
                    f"{where}: {', '.join(map(repr, bad))} is not a device kind; "
                    f"known: {', '.join(DEVICE_KINDS)}"
                )
            for kind, name in given.items():
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"{where}.{kind}: expected a backend name; got {name!r}")
            out = cls(tuple(sorted({**dict(DEFAULT_BACKENDS), **given}.items())))
        if known is not None:
            names = sorted(known)
            for kind, name in out.by_kind:
                if name not in names:
                    raise ConfigError(
                        f"{where}.{kind}: no backend {name!r}; known: {', '.join(names)}"
                    )
        return out

    @classmethod
    def everywhere(cls, name: str) -> BackendAssignment:
        """Every device kind through one backend."""
        return cls(tuple((kind, name) for kind in sorted(DEVICE_KINDS)))

    def for_kind(self, kind: str) -> str:
        return dict(self.by_kind).get(kind, FALLBACK_BACKEND)

    def for_device(self, device: DeviceSpec) -> str:
        return self.for_kind(device.kind)

    def names(self) -> tuple[str, ...]:
        """The backend names it uses, each once."""
        return tuple(dict.fromkeys(name for _, name in self.by_kind))

    def with_kind(self, kind: str, name: str) -> BackendAssignment:
        return BackendAssignment(tuple(sorted({**dict(self.by_kind), kind: name}.items())))

    def to_dict(self) -> dict[str, str]:
        return dict(self.by_kind)

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.by_kind)
