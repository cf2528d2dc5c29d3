"""The reference to beat: a partition through torch.compile (Inductor also emits Triton).

The artifact is the partition as a torch.export program (`program.pt2`, weights inside)
plus `inductor.json` with the torch.compile settings; `load` compiles it for the device
it runs on (Inductor's own cache makes the second load fast). The planner can choose it
per partition by predicted or measured time.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from hetero.backends.base import (
    YES,
    Artifact,
    Backend,
    BackendOptions,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
    Support,
)
from hetero.backends.eager import WEIGHTS_FILE, export_streamed, torch_device
from hetero.backends.export import export_unit
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError

MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


@dataclass(frozen=True)
class InductorOptions(BackendOptions):
    mode: str | None = None  # a torch.compile mode (MODES); None: torch.compile's default
    fullgraph: bool = True  # one graph, no graph breaks (a partition is one ATen graph)
    # streamed: the program takes its parameters and state as inputs after the activations,
    # as the eager backend's does (generation binds them per device)
    weights: str = "resident"


class InductorBackend(Backend):
    name = "inductor"
    device_kinds = ("gpu", "cpu")
    holds_state = True
    fuses = True
    options_type = InductorOptions

    def available(self) -> Support:
        if not hasattr(torch, "compile"):
            return Support(False, "this torch has no torch.compile")
        return YES

    def target(self, device: DeviceSpec, options: CompileOptions) -> str:
        mode = self.parse_options(options).mode
        return f"inductor:{device.kind}:{device.model or 'any'}:{mode or 'default'}"

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        own = self.parse_options(options)
        mode = own.mode
        if mode not in MODES:
            raise CompileError(
                f"partition {unit.name}: unknown torch.compile mode {mode!r} in the options of "
                f"backend 'inductor'; use one of {', '.join(str(m) for m in MODES)}"
            )
        dtype = getattr(torch, options.dtype) if options.dtype else None
        streamed = own.weights == "streamed" or unit.bound_params
        files = ["program.pt2", "inductor.json"]
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if streamed:
                # bound params: traced on the host, pointed at the device at load
                here = device.kind == "gpu" and torch.cuda.is_available() and not unit.bound_params
                ep, weights = export_streamed(unit, dtype, torch_device(device) if here else None)
            else:
                ep = export_unit(unit, dtype)
        except Exception as e:
            raise CompileError(
                f"partition {unit.name}: torch.export of the partition failed for inductor "
                f"({type(e).__name__}: {e})"
            ) from e
        if streamed and not unit.bound_params:
            order = json.dumps(list(weights))
            save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"params": order})
            files.append(WEIGHTS_FILE)
        torch.export.save(ep, out_dir / "program.pt2")
        settings = {
            "mode": mode,
            "fullgraph": own.fullgraph,
            "dynamic": bool(options.dynamic or unit.dynamic_dims),
        }
        (out_dir / "inductor.json").write_text(json.dumps(settings, indent=1))
        return self.manifest(unit, device, options, out_dir, files)

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        settings = json.loads((artifact.path / "inductor.json").read_text())
        # torch.export.load reads a program and its weights; it never unpickles code.
        ep = torch.export.load(artifact.path / "program.pt2")
        dev = torch_device(device)
        mod = ep.module().to(dev)
        compiled = torch.compile(
            mod,
            mode=settings["mode"],
            fullgraph=settings["fullgraph"],
            dynamic=settings["dynamic"],
        )

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return tuple(compiled(*[a.to(dev) for a in acts]))

        return run
