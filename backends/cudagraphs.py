"""Eager with CUDA graphs: the partition's ATen program (the eager backend's artifact),
captured once per input shape on its GPU and replayed, so the host launches the whole
partition at once. What `torch.compile(backend="cudagraphs")` gives for free, and the
reference the measured choice (runtime/choice.py) holds Triton and Inductor to on a GPU.

A partition whose ops cannot be captured (a host sync, a CPU tensor) runs as plain eager
from its first call on. Static shapes only: one graph per shape would hold one memory
pool per prompt length.

`replayed` is the capture-and-replay wrapper both graph backends share (this one, and
`inductor-cudagraphs` in backends/inductor.py).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from hetero.backends.base import Artifact, CompileOptions, CompileUnit, Manifest, Runner
from hetero.backends.eager import EagerBackend, torch_device
from hetero.backends.triton.graphs import replay_or_run
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError


def check_static(backend: str, unit: CompileUnit, options: CompileOptions, weights: str) -> None:
    """A CompileError unless `unit` can be replayed as a graph: static shapes, resident weights."""
    if options.dynamic or unit.dynamic_dims:
        raise CompileError(
            f"partition {unit.name}: the {backend} backend replays static shapes only and "
            f"this partition has dynamic dims {unit.dynamic_dims}; use 'eager' or "
            "'inductor' for it"
        )
    if weights != "resident" or unit.bound_params:
        raise CompileError(
            f"partition {unit.name}: the {backend} backend keeps the weights inside the "
            "program; streamed or bound weights go through 'eager' or 'inductor'"
        )


def replayed(run: Runner, device: DeviceSpec, clone_outputs: bool = True) -> Runner:
    """`run` captured as a CUDA graph on its first call per input signature and replayed
    after, its outputs cloned out of the graph's pool (they flow into other partitions and
    to the caller, and the next replay would overwrite them). `run` itself where there is
    no CUDA device, and from the first call that cannot be captured on
    (`triton.graphs.replay_or_run`)."""
    dev = torch_device(device)
    if dev.type != "cuda" or not torch.cuda.is_available():
        return run
    return replay_or_run(run, dev, clone_outputs)


class Replayed:
    """A backend's artifacts replayed as CUDA graphs: mixed in before the backend it
    replays (`class B(Replayed, EagerBackend)`), it refuses what a graph cannot hold at
    compile and wraps the loaded runner in `replayed`."""

    device_kinds = ("gpu",)
    holds_state = False  # a graph replays fixed addresses: weights live inside the program
    last_resort_kinds = ()  # not the eager backend's: a replay is a candidate in full

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        check_static(self.name, unit, options, self.parse_options(options).weights)
        return super().compile(unit, device, options, out_dir)

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        return replayed(super().load(artifact, device), device)

    def load_warmed(
        self, artifact: Artifact, device: DeviceSpec, ready: Callable[[], object]
    ) -> Runner:
        # the measured choice loads a warmed candidate through this, not `load`: replayed
        # too, or the candidate would be timed without its graphs
        return replayed(super().load_warmed(artifact, device, ready), device)  # type: ignore[misc]


class CudaGraphsBackend(Replayed, EagerBackend):
    name = "cudagraphs"
    # Both replay the partition as CUDA graphs; Inductor's program does the same ATen work
    # in fused kernels. Measured on H100/H200 (backend_suite.md, runs 3-5, 32, 39): slower in
    # all five rows that had both, by 1.4-3.0x (ConvNeXt-T 3.29 vs 2.29 ms, MobileNetV3-L 2.66
    # vs 0.88, GPT-2 4.14 vs 2.30, Mixtral 9.01 vs 6.07), while its compile and capture took
    # 5.1 s of GPT-2's 36 s compile and 6.8 s of Mixtral's 62.
    outclassed_by = ("inductor-cudagraphs",)
