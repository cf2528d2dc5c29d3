"""What the runtime runs: stages (one compiled partition bound to a device) and the
executor contract every way of running them follows.

A stage reads graph values by name (user inputs or other stages' outputs) and produces
graph values by name; parameters live inside its artifact, or, for a streamed stage, in
its artifact's weights file, kept in host memory and copied to the GPU before each call
(runtime/streaming.py). The stage list of a plan is in a topological order, so running
the stages in list order is always valid.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from hetero.backends.base import Artifact, CompileOptions
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.runtime.split_linear import SharedMatmuls

CALLER = -1  # the "stage" that supplies user inputs and receives the results


@dataclass(frozen=True)
class StageSpec:
    """One compiled partition placed on one device."""

    index: int  # the plan's partition index
    device: DeviceSpec
    backend: str  # registry name of the backend that compiled `artifact`
    artifact: Artifact
    inputs: tuple[str, ...]  # activations, in the order the artifact's runner takes them
    outputs: tuple[str, ...]  # values the runner returns, in order
    nodes: tuple[str, ...] = ()  # captured op names it computes (verify re-splits by them)
    predicted_ms: float = 0.0  # the cost model's time for one run (0: unknown)
    options: CompileOptions = field(default_factory=CompileOptions)  # what `artifact` got
    weights: str = "resident"  # resident (inside the runner) | streamed (runner inputs)
    params: tuple[str, ...] = ()  # streamed: the parameters the runner takes after `inputs`
    partition: int | None = None  # the plan partition a streamed piece belongs to
    piece: int = 0  # which piece of that partition (one per streamed group)
    # Generation (runtime/generation.py): every param the runner takes is bound by the
    # worker: `state` ones (a KV cache, updated in place) from the device's state, the rest
    # from its resident weights, its weight streamer (weights "streamed"), or, weights
    # "split", the streamer for the GPU's rows and host memory for the CPU's (`cpu_shares`).
    state: tuple[str, ...] = ()
    cpu_shares: tuple[str, ...] = ()
    phase: str = ""
    # split: per shared group k (inputs gpu{k}, cpu{k}), its weights and what of each the
    # GPU takes; the worker cuts both shares from the full weights, the CPU's in cpu_dtype.
    # A stage with no shares and a cpu_dtype computes in it: its 16-bit weights and state
    # are bound in that dtype (runtime/retype.py)
    shares: tuple[SharedMatmuls, ...] = ()
    cpu_dtype: str = ""
    # The artifact's program as the process that built it made it (backends/export.py's
    # `built_program`): that process's binder runs it rather than reading the file back. Not
    # part of the stage's identity; never sent to another process (`__getstate__`), where
    # the file is read.
    program: torch.export.ExportedProgram | None = field(default=None, compare=False, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "program": None}

    @property
    def plan_index(self) -> int:
        """The plan partition this stage computes (all or, when streamed, a piece of)."""
        return self.index if self.partition is None else self.partition

    @property
    def name(self) -> str:
        prefix = f"{self.phase}:" if self.phase else ""
        if self.weights in ("streamed", "split"):
            return f"{prefix}p{self.plan_index}.{self.piece}"
        return f"{prefix}p{self.index}"


@runtime_checkable
class Executor(Protocol):
    """How `hetero.compile` runs a plan: in this process or over Ray actors."""

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Graph inputs by placeholder name -> every value named in `needed_outputs`."""
        ...

    def run_many(
        self, batch: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Several requests at once; pipelined across stages where the executor can."""
        ...

    def measured_ms(self) -> dict[int, float]:
        """Mean measured compute time per stage index, over the runs so far."""
        ...

    def shutdown(self) -> None: ...


def producers(stages: Sequence[StageSpec]) -> dict[str, int]:
    """value name -> index of the stage that computes it."""
    out: dict[str, int] = {}
    for s in stages:
        for v in s.outputs:
            out[v] = s.index
    return out


def sources(stage: StageSpec, made_by: Mapping[str, int]) -> tuple[int, ...]:
    """Indices of the stages `stage` reads from (CALLER for user inputs), sorted."""
    return tuple(sorted({made_by.get(v, CALLER) for v in stage.inputs}))


def check_stages(
    stages: Sequence[StageSpec], user_inputs: Sequence[str], needed_outputs: Sequence[str]
) -> None:
    """Raise ConfigError unless the stages can run in list order and produce what is needed."""
    if not stages:
        raise ConfigError("no stages to run: the plan has no partitions")
    seen = {s.index for s in stages}
    if len(seen) != len(stages):
        dupes = sorted(i for i in seen if sum(s.index == i for s in stages) > 1)
        raise ConfigError(f"stage indices must be unique; repeated: {dupes}")
    available = set(user_inputs)
    problems = []
    for s in stages:
        missing = [v for v in s.inputs if v not in available]
        if missing:
            problems.append(
                f"stage {s.name} on {s.device.name} reads {missing}, which no earlier stage "
                "computes and which are not user inputs"
            )
        available.update(s.outputs)
    unmade = [v for v in needed_outputs if v not in available]
    if unmade:
        problems.append(f"needed outputs {unmade} are computed by no stage")
    if problems:
        raise ConfigError(
            "the stages do not form a runnable pipeline:\n  "
            + "\n  ".join(problems)
            + "\n  Build the stages from one plan, in the plan's partition order."
        )
