"""Eager with CUDA graphs: the partition's ATen program (the eager backend's artifact),
captured once per input shape on its GPU and replayed, so the host launches the whole
partition at once. What `torch.compile(backend="cudagraphs")` gives for free, and the
reference the measured choice (runtime/choice.py) holds Triton and Inductor to on a GPU.

A partition whose ops cannot be captured (a host sync, a CPU tensor) runs as plain eager
from its first call on. Static shapes only: one graph per shape would hold one memory
pool per prompt length.
"""

from __future__ import annotations

from pathlib import Path

import torch

from hetero.backends.base import Artifact, CompileOptions, CompileUnit, Manifest, Runner
from hetero.backends.eager import EagerBackend, torch_device
from hetero.backends.triton.graphs import GraphRunner
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError


class CudaGraphsBackend(EagerBackend):
    name = "cudagraphs"
    device_kinds = ("gpu",)
    holds_state = False  # a graph replays fixed addresses: weights live inside the program

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        if options.dynamic or unit.dynamic_dims:
            raise CompileError(
                f"partition {unit.name}: the cudagraphs backend replays static shapes only and "
                f"this partition has dynamic dims {unit.dynamic_dims}; use 'eager' or "
                "'inductor' for it"
            )
        if self.parse_options(options).weights != "resident" or unit.bound_params:
            raise CompileError(
                f"partition {unit.name}: the cudagraphs backend keeps the weights inside the "
                "program; streamed or bound weights go through 'eager' or 'inductor'"
            )
        return super().compile(unit, device, options, out_dir)

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        run = super().load(artifact, device)
        if torch_device(device).type != "cuda" or not torch.cuda.is_available():
            return run
        dev = torch_device(device)
        graphs = GraphRunner(run)
        failed: list[BaseException] = []

        def replay(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if failed or not all(isinstance(a, torch.Tensor) for a in acts):
                return run(*acts)
            try:
                with torch.cuda.device(dev):
                    return graphs(*[a.to(dev) for a in acts])
            except Exception as e:  # not capturable (a host sync, ...): eager from now on
                failed.append(e)
                torch.cuda.synchronize(dev)
                return run(*acts)

        return replay
