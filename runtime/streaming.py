"""Running partitions whose weights live in host memory (PlannedPartition.weights == "streamed").

Granularity: the planner's memory model holds two copies of the largest streamed *group*
(a decoder layer, the lm_head) on the GPU, not of a whole partition. So a streamed
partition becomes one stage per group ("piece"; groups without parameters ride along
with their neighbour): each piece is compiled with its parameters as inputs
(backends/eager.py, weights="streamed"), and one `WeightStreamer` per device serves all of
that device's pieces in execution order, copying piece k+1's weights on a side stream
while piece k computes, and piece 0's during the last one (for the next request).

One stage per piece, rather than one stage that streams inside itself, keeps every
runner a plain "activations in, activations out" call: the executors, metrics and
the Ray workers need no second code path, and a piece's time shows in the metrics.
Pieces keep their plan partition in `StageSpec.partition`.

Runners (`stream_runner`): "eager" runs the piece's program op by op; "inductor" runs it
through torch.compile with the weights as inputs (no CUDA graphs: the weights' addresses
change with the slot). A decoder layer is ~85 ATen ops: eager spends ~2 ms of CPU per
layer launching them, more than the 1.6 ms its 88 MB take over PCIe Gen5, so decode went
CPU-bound (53.6 ms vs a 33.6 ms copy bound on an H100); Inductor's fused kernels launch
in a fraction of that. Pieces with the same program up to names (every decoder layer)
share one compiled module, so a 22-layer model compiles a few graphs, not 22. "auto"
takes inductor on CUDA, eager elsewhere; a piece whose compile fails falls back to eager.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileOptions, Runner, _canonical_graph
from hetero.backends.eager import load_weights, torch_device
from hetero.backends.export import runnable
from hetero.backends.registry import BackendRegistry
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan
from hetero.runtime.artifacts import load_runner, verify_artifact
from hetero.runtime.stage import StageSpec
from hetero.runtime.weight_stream import WeightStreamer

STREAMED = "streamed"
STREAM_BACKEND = "eager"  # the backend whose artifacts take parameters as inputs
STREAM_RUNNERS = ("auto", "eager", "inductor")

log = logging.getLogger("hetero.runtime")


def streamed_options(options: CompileOptions | None) -> CompileOptions:
    """`options` with weights="streamed" (parameters become runner inputs)."""
    return (options or CompileOptions()).with_extra(weights=STREAMED)


def piece_assignment(
    graph: OpGraph, plan: Plan
) -> tuple[dict[str, int], dict[int, tuple[int, int]]]:
    """Cut every streamed partition of `plan` into one piece per parameter-holding group.

    Returns (op name -> piece id, piece id -> (plan partition index, piece number)). A
    resident partition is one piece with number 0; ids are fresh integers.
    """
    streamed = [p for p in plan.partitions if p.weights == STREAMED]
    group_of: Mapping[str, str] = {}
    param_groups: set[str] = set()
    if streamed:
        groups = graph.coarsen()
        group_of = groups.group_of
        param_groups = {g.name for g in groups.groups if g.param_bytes > 0}
    assignment: dict[str, int] = {}
    pieces: dict[int, tuple[int, int]] = {}
    next_id = 0
    for p in plan.partitions:
        if p.weights != STREAMED:
            pieces[next_id] = (p.index, 0)
            assignment.update(dict.fromkeys(p.nodes, next_id))
            next_id += 1
            continue
        number, piece, has_params, current = -1, -1, False, None
        for n in p.nodes:
            g = group_of.get(n, current)
            if piece < 0 or (g != current and g in param_groups and has_params):
                number, piece, has_params = number + 1, next_id, False
                pieces[piece] = (p.index, number)
                next_id += 1
            has_params = has_params or g in param_groups
            current = g
            assignment[n] = piece
    return assignment, pieces


class StreamedRunner:
    """A piece's runner fed with its weights from the device's streamer."""

    def __init__(self, runner: Runner, streamer: WeightStreamer, item: int) -> None:
        self.runner = runner
        self.streamer = streamer
        self.item = item

    def __call__(self, *acts: Any) -> tuple[torch.Tensor, ...]:
        weights = self.streamer.acquire(self.item)
        try:
            return self.runner(*acts, *weights)
        finally:
            self.streamer.release(self.item)


class _CompiledPiece:
    """A streamed piece's program through torch.compile; eager if compiling fails."""

    def __init__(self, module: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.compiled = torch.compile(module, fullgraph=True, dynamic=False)
        self.failed: BaseException | None = None

    def __call__(self, eager: Runner, *args: Any) -> tuple[torch.Tensor, ...]:
        if self.failed is None:
            try:
                with torch.no_grad():
                    return tuple(self.compiled(*[a.to(self.device) for a in args]))
            except Exception as e:  # an op Inductor cannot take: the piece still runs
                self.failed = e
                log.warning("torch.compile of a streamed piece failed (%s); running it eagerly", e)
        return eager(*args)


class _Bound:
    """One piece's call into a (shared) compiled program, with its own eager fallback."""

    def __init__(self, compiled: _CompiledPiece, eager: Runner) -> None:
        self.compiled = compiled
        self.eager = eager

    def __call__(self, *args: Any) -> tuple[torch.Tensor, ...]:
        return self.compiled(self.eager, *args)


def program_key(program: torch.export.ExportedProgram) -> str:
    """Equal for programs that compute the same thing up to node names (decoder layers)."""
    h = hashlib.sha256(_canonical_graph(program.graph_module.graph).encode())
    for n in program.graph.nodes:
        val = n.meta.get("val") if n.op == "placeholder" else None
        if isinstance(val, torch.Tensor):
            h.update(f"{tuple(val.shape)}{val.dtype}{val.stride()}".encode())
    for name, t in sorted(program.constants.items()):
        h.update(name.encode())
        if isinstance(t, torch.Tensor):
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _use_inductor(stream_runner: str, device: torch.device) -> bool:
    if stream_runner not in STREAM_RUNNERS:
        raise ConfigError(
            f"stream_runner {stream_runner!r} is not one of {', '.join(STREAM_RUNNERS)}"
        )
    if stream_runner == "auto":
        return device.type == "cuda" and torch.cuda.is_available() and hasattr(torch, "compile")
    return stream_runner == "inductor"


def load_runners(
    stages: Sequence[StageSpec],
    registry: BackendRegistry,
    device_of: Mapping[int, DeviceSpec] | None = None,
    slots: int = 2,
    stream_runner: str = "auto",
) -> tuple[dict[int, Runner], dict[str, WeightStreamer]]:
    """Every stage's runner; streamed stages share one WeightStreamer per device.

    `device_of`: stage index -> the device as this process addresses it (default: the
    stage's own). `stream_runner`: how streamed pieces run (see the module docstring).
    Returns (stage index -> runner, device name -> its streamer).
    """
    device_of = dict(device_of or {})
    runners: dict[int, Runner] = {}
    by_device: dict[str, list[StageSpec]] = {}
    for s in stages:
        dev = device_of.get(s.index, s.device)
        if s.weights == STREAMED:
            if s.backend != STREAM_BACKEND:
                raise ConfigError(
                    f"stage {s.name} streams its weights but was compiled by {s.backend!r}; "
                    f"only {STREAM_BACKEND!r} artifacts take weights as inputs. Rebuild the "
                    "stages with hetero.runtime.build.compile_plan."
                )
            by_device.setdefault(dev.name, []).append(s)
        runners[s.index] = load_runner(s.artifact, dev, registry)
    streamers: dict[str, WeightStreamer] = {}
    for name, group in by_device.items():
        dev = device_of.get(group[0].index, group[0].device)
        tdev = torch_device(dev)
        compiled: dict[str, _CompiledPiece] | None = (
            {} if _use_inductor(stream_runner, tdev) else None
        )
        weights = []
        for s in group:
            verify_artifact(s.artifact)
            weights.append(load_weights(s.artifact))
            if compiled is not None:
                if s.artifact.key not in compiled:  # equal keys: equal programs, one load
                    # torch.export.load reads a program; it never unpickles code.
                    program = torch.export.load(Path(s.artifact.path) / "program.pt2")
                    key = program_key(program)
                    if key not in compiled:
                        compiled[key] = _CompiledPiece(runnable(program).to(tdev), tdev)
                    compiled[s.artifact.key] = compiled[key]
                runners[s.index] = _Bound(compiled[s.artifact.key], runners[s.index])
        streamer = WeightStreamer(weights, tdev, slots=slots)
        for k, s in enumerate(group):
            runners[s.index] = StreamedRunner(runners[s.index], streamer, k)
        streamer.prefetch(0)  # the first request starts with its first weights on their way
        streamers[name] = streamer
    return runners, streamers
