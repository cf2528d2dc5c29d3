"""The decisions a person makes about a plan, typed once at the edge and passed down.

`Objective` (what the plan minimises), `BackendAssignment` (which backend compiles each
device kind's partitions, and which kinds the person pinned), `BackendChoice` (whether
the unpinned kinds' backends are chosen per partition by measurement) and `ExecutorKind`
(the runtime the plan is priced for and runs on) and `FeedbackRounds` (how much a
generation's compile measures and re-plans) are parsed where
they enter hetero (`hetero.plan`, `hetero.compile`, the deploy config, the CLI);
everything below takes these types and never reads a string again.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from hetero.cluster.schema import did_you_mean
from hetero.cluster.spec import DEVICE_KINDS, ClusterSpec, DeviceSpec
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
        return _member(cls, value, where, "an objective")


class Task(str, enum.Enum):
    """What a compiled model is for."""

    FORWARD = "forward"  # one stateless forward per request (`cm(*inputs)`)
    GENERATE = "generate"  # a causal LM with a KV cache: prefill, then decode per token

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Task | str, where: str = "task") -> Task:
        return _member(cls, value, where, "a task")


class ExecutorKind(str, enum.Enum):
    """The runtime that runs a plan's stages. A `str` whose value keys the calibration
    profile's measured `runtime` entries (cluster/profile.py) and the run logs."""

    LOCAL = "local"  # in this process, stages called one after another
    RAY = "ray"  # one Ray actor per device; the caller (the driver) is a process apart

    def __str__(self) -> str:
        return self.value

    @property
    def caller_apart(self) -> bool:
        """The caller's inputs and outputs cross into and out of the workers, even those
        on the caller's own host: every request pays a hop each way."""
        return self is ExecutorKind.RAY

    @classmethod
    def parse(
        cls, value: ExecutorKind | str, cluster: ClusterSpec, where: str = "executor"
    ) -> ExecutorKind:
        """The executor `value` names; "auto" is local on a one-host `cluster`, Ray on more.
        A ConfigError listing the known ones otherwise."""
        if isinstance(value, cls):
            return value
        if value == "auto":
            return cls.LOCAL if len(cluster.hosts) == 1 else cls.RAY
        try:
            return cls(value)
        except ValueError:
            known = ("auto", *(e.value for e in cls))
            hint = did_you_mean(str(value), known)
            raise ConfigError(
                f"{where}: {value!r} is not an executor{hint}; known: {', '.join(known)}"
            ) from None


# (kind, backend), sorted by kind. gpu: our own Triton fusion; cpu and npu: TVM (an NPU compiles for the host and is emulated)
DEFAULT_BACKENDS: tuple[tuple[str, str], ...] = (("cpu", "tvm"), ("gpu", "triton"), ("npu", "tvm"))
FALLBACK_BACKEND = "eager"  # runs every op on every device; used where the asked one cannot


@dataclass(frozen=True)
class BackendAssignment:
    """Which backend compiles the partitions of each device kind (`by_kind`, kind -> name,
    sorted; a kind not listed runs `FALLBACK_BACKEND`). `pinned`: the kinds a person named
    (sorted); the measured choice (`BackendChoice`) never replaces their backend."""

    by_kind: tuple[tuple[str, str], ...] = DEFAULT_BACKENDS
    pinned: tuple[str, ...] = ()

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
                    f"{where}: {', '.join(map(repr, bad))} is not a device kind"
                    f"{did_you_mean(bad[0], DEVICE_KINDS)}; known: {', '.join(DEVICE_KINDS)}"
                )
            for kind, name in given.items():
                if not isinstance(name, str) or not name:
                    raise ConfigError(f"{where}.{kind}: expected a backend name; got {name!r}")
            out = cls(
                tuple(sorted({**dict(DEFAULT_BACKENDS), **given}.items())), tuple(sorted(given))
            )
        if known is not None:
            names = sorted(known)
            for kind, name in out.by_kind:
                if name not in names:
                    raise ConfigError(
                        f"{where}.{kind}: no backend {name!r}{did_you_mean(name, names)}; "
                        f"known: {', '.join(names)}"
                    )
        return out

    @classmethod
    def everywhere(cls, name: str) -> BackendAssignment:
        """Every device kind through one backend (pinned)."""
        kinds = tuple(sorted(DEVICE_KINDS))
        return cls(tuple((kind, name) for kind in kinds), kinds)

    def for_kind(self, kind: str) -> str:
        return dict(self.by_kind).get(kind, FALLBACK_BACKEND)

    def for_device(self, device: DeviceSpec) -> str:
        return self.for_kind(device.kind)

    def names(self) -> tuple[str, ...]:
        """The backend names it uses, each once."""
        return tuple(dict.fromkeys(name for _, name in self.by_kind))

    def with_kind(self, kind: str, name: str) -> BackendAssignment:
        return BackendAssignment(
            tuple(sorted({**dict(self.by_kind), kind: name}.items())), self.pinned
        )

    def is_pinned(self, kind: str) -> bool:
        return kind in self.pinned

    def to_dict(self) -> dict[str, str]:
        return dict(self.by_kind)

    def __str__(self) -> str:
        return ", ".join(f"{k}: {v}" for k, v in self.by_kind)


class Choose(str, enum.Enum):
    """How each partition's backend is chosen among those its device kind has."""

    MEASURED = "measured"  # compile with each, time each on the device, keep the fastest
    FIXED = "fixed"  # the assignment's backend for the kind (no extra compiles)

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: Choose | str, where: str = "choose") -> Choose:
        return _member(cls, value, where, "a way to choose")


class HostPrecision(str, enum.Enum):
    """Which dtypes a host CPU may compute a 16-bit model's work in (partitioner/host_dtype.py).
    MODEL: none with less mantissa than the model's own (a float16 model's CPU rows stay
    float16, or float32): run 28's bfloat16 rows, read 13% faster, put the logits 3.5% off the
    GPU's where the goal is 2%. FASTEST: whichever the measured rates make fastest, bfloat16
    copies of a float16 model included (~7% of run 28's decode step), for a person who takes
    those numerics."""

    MODEL = "model"
    FASTEST = "fastest"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, value: HostPrecision | str, where: str = "host_precision") -> HostPrecision:
        return _member(cls, value, where, "a host precision")


def _member(cls, value, where: str, what: str):
    """`value` as a member of the enum `cls`, or a ConfigError naming `where`, the nearest
    value and the known ones."""
    if isinstance(value, cls):
        return value
    try:
        return cls(value)
    except ValueError:
        known = ", ".join(c.value for c in cls)
        hint = did_you_mean(value, (c.value for c in cls))
        raise ConfigError(f"{where}: {value!r} is not {what}{hint}; known: {known}") from None


CHOOSE_ENV = "HETERO_CHOOSE"  # the default `choose` where none is given (CI: fixed)
DEFAULT_CHOICE_BUDGET_S = 600.0


@dataclass(frozen=True)
class BackendChoice:
    """Whether backends are chosen per partition by measurement (`mode`) and how many
    seconds of extra compiling and timing one compile may spend on it (`budget_s`: past it,
    the remaining partitions keep the assignment's backend, and the plan says so). Only
    kinds with more than one usable backend that the person did not pin are measured."""

    mode: Choose = Choose.MEASURED
    budget_s: float = DEFAULT_CHOICE_BUDGET_S

    def __post_init__(self) -> None:
        if not self.budget_s >= 0:
            raise ConfigError(f"choose budget: {self.budget_s!r} s must be >= 0")

    @property
    def measured(self) -> bool:
        return self.mode is Choose.MEASURED

    @classmethod
    def parse(
        cls, value: BackendChoice | Choose | str | None, where: str = "choose"
    ) -> BackendChoice:
        """`value` typed; None: the `HETERO_CHOOSE` environment variable, else measured."""
        if isinstance(value, cls):
            return value
        if value is None:
            value = os.environ.get(CHOOSE_ENV) or Choose.MEASURED
            where = CHOOSE_ENV if CHOOSE_ENV in os.environ else where
        return cls(Choose.parse(value, where))

    def __str__(self) -> str:
        return f"{self.mode} (budget {self.budget_s:g} s)" if self.measured else str(self.mode)


@dataclass(frozen=True)
class FeedbackRounds:
    """How much a generation's compile may measure and re-plan (`feedback=`; True is the
    default one). At most `rounds` measured rounds: a re-planned plan is priced with
    corrections learnt on another plan's partitions (run 15: the first plan's split layers
    corrected, the re-plan's CPU layers then ran 9.3 ms against 7.3 priced), so it is
    measured in turn, and the last round only goes back to a plan measured faster: the plan
    kept is never one measured slower. `budget_s`: seconds of rounds after which the next
    round is the last (it starts as the last one once the rounds so far plus the longest
    of them would pass the budget: a 7B's three rounds took 155 s on a slow host, run 34).
    The first round always runs; a last round measures a plan rebuilt unmeasured."""

    rounds: int = 3
    budget_s: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError(f"FeedbackRounds(rounds={self.rounds!r}): give 1 or more rounds")
        if self.budget_s is not None and not self.budget_s > 0:
            raise ConfigError(
                f"FeedbackRounds(budget_s={self.budget_s!r}): give seconds above 0, or None "
                "for no limit"
            )

    @staticmethod
    def parse(feedback: bool | FeedbackRounds) -> FeedbackRounds | None:
        """compile_lm's `feedback`: None (no rounds), or the rounds' limits."""
        if isinstance(feedback, FeedbackRounds):
            return feedback
        if not isinstance(feedback, bool):  # "no" would be true
            raise ConfigError(
                f"feedback={feedback!r}: give True (measured rounds), False, or a "
                "hetero.FeedbackRounds (how many, and a time budget)"
            )
        return FeedbackRounds() if feedback else None
