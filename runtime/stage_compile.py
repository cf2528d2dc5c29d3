"""How a generation stage's program runs on its device: op by op, or through Inductor
(`InductorStage`); the one place that builds the compiled module, so that a warming process
(runtime/stage_warm.py) compiles exactly what the binding process will.
"""

from __future__ import annotations

import enum
import itertools
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from hetero.backends.export import runnable
from hetero.backends.inductor import launched_in
from hetero.partitioner.phases import Phase
from hetero.runtime.build import retarget
from hetero.runtime.stage import StageSpec

log = logging.getLogger("hetero.runtime")


class CompileMode(enum.Enum):
    """How a GPU stage's program runs: op by op, or through Inductor for fixed shapes
    (decode's one token) or for a symbolic prompt length (prefill)."""

    OP_BY_OP = "op-by-op"
    STATIC = "static"
    DYNAMIC = "dynamic"
    # the host CPU's decode: op by op, or Inductor's static program where a feedback round
    # measured it faster (runtime/measured_choice.py)
    MEASURED = "measured"


def compile_mode(phase: Phase, stage: StageSpec, stages: Sequence[StageSpec]) -> CompileMode:
    """Decode's tiny steps are what the host's dispatch bounds: they compile. Prefill
    compiles only where its device streams nothing in that phase: a streamed prompt's GPU
    waits on the link while the host queues op by op (the 7B under a 4 GiB cap: ~7 ms per
    layer's copy), while an all-resident prompt ran op by op at 49 ms to the first token
    on an H200 against torch.compile's 9 (run 8), the host's dispatch the bound. One
    Inductor compile over a symbolic prompt length serves every prompt."""
    if phase is Phase.DECODE:
        return CompileMode.STATIC
    streams = any(
        t.weights != "resident" or t.shares for t in stages if t.device.name == stage.device.name
    )  # `stage` among them
    return CompileMode.OP_BY_OP if streams else CompileMode.DYNAMIC


def on_device(program: Any, dev: torch.device) -> torch.fx.GraphModule:
    """`program` as a module on `dev`."""
    mod = runnable(program)
    retarget(mod, dev)  # traced on the host: its own tensors follow it here
    return mod.to(dev)


class InductorStage:
    """A program through torch.compile (Inductor); run as it is if compiling fails, with a
    warning naming the stage (a missing kernel must not stop a generation). `dynamic_dims`:
    (input, dim) sizes kept symbolic (the prompt's length: `symbolic_dims`), every other
    size static; none: one compile for the shapes of the first call.

    `ready`: called once Dynamo has traced the program and Inductor is about to compile it
    (the wait for a warming process compiling the same: runtime/stage_warming.py).
    `launch_in`: a warming's (on a GPU) — the compiled program's calls run inside
    `launch_in()`, its turn on the card (backends/gpu_turn.py): the first launch of
    Inductor's kernels times their configs and caches the best, which the binding process
    then reads instead of timing them. Either one compiles through the backend
    torch.compile's "inductor" calls (`compile_fx`), so both processes make the same cache
    entries."""

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        dynamic_dims: Sequence[tuple[int, int]],
        name: str,
        ready: Callable[[], object] | None = None,
        launch_in: Callable[[], AbstractContextManager] | None = None,
    ) -> None:
        self.module = module
        self.dynamic_dims = tuple(dynamic_dims)
        backend: Any = "inductor"
        if ready is not None or launch_in is not None:
            # imported here: 0.9 s that only a warmed compile pays
            from torch._inductor.compile_fx import compile_fx

            def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
                if ready is not None:
                    ready()
                compiled = compile_fx(gm, example_inputs)
                return compiled if launch_in is None else launched_in(compiled, launch_in)

        # marked per call rather than dynamic=True, which would make the weights' sizes
        # symbols too
        self.compiled = torch.compile(
            module, backend=backend, dynamic=None if self.dynamic_dims else False, fullgraph=False
        )
        self.name = name
        self.warmed = ready is not None or launch_in is not None  # a side of a warming
        self.failed: BaseException | None = None

    def __call__(self, *args: Any) -> Any:
        if self.failed is None:
            if self.warmed:  # laid out as the warming's zeros were (a step's few µs)
                args = tuple(canonical_strides(a) for a in args)
            try:
                for k, d in self.dynamic_dims:
                    torch._dynamo.mark_dynamic(args[k], d)
                return self.compiled(*args)
            except Exception as e:  # Inductor cannot take it: the program still runs
                self.failed = e
                log.warning("torch.compile of %s failed (%s); running it op by op", self.name, e)
        return self.module(*args)


def canonical_strides(t: Any) -> Any:
    """`t` laid out as a fresh row-major tensor of its shape would be, where its sizes above
    1 already run in row-major order (a view where only size-1 dims' strides differ, a copy
    where it is a slice); any other layout as it is. Which of these an activation arrives
    in is an accident of what made it (a [2, 1] slice of a [2, 32] tensor has strides
    (32, 1), a fresh one (1, 1)), but Inductor keys its compiled graphs by them: a warming
    process's zeros, laid out so (`row_major`), and this process's values then hit one
    cache entry."""
    if not isinstance(t, torch.Tensor):
        return t
    if not t.is_contiguous():
        return canonical_strides(t.contiguous()) if row_major(t.shape, t.stride()) else t
    if 1 not in t.shape:
        return t
    want = contiguous_strides(t.shape)
    return t if t.stride() == want else t.as_strided(t.shape, want)


def row_major(shape: Sequence[int], stride: Sequence[int]) -> bool:
    """Whether the dims of `shape` above size 1 are laid out outermost first, none
    broadcast (a stride of 0)."""
    strides = [st for n, st in zip(shape, stride, strict=True) if n != 1]
    return all(st > 0 for st in strides) and all(a > b for a, b in itertools.pairwise(strides))


def contiguous_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of a fresh contiguous tensor of `shape`."""
    out, step = [], 1
    for size in reversed(shape):
        out.append(step)
        step *= max(size, 1)
    return tuple(reversed(out))
