"""The reference backend: the partition as plain PyTorch, saved as a torch.export `.pt2`."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from hetero.backends.base import (
    Artifact,
    Backend,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
    hash_files,
)
from hetero.backends.export import export_unit
from hetero.cluster.spec import DeviceSpec


def torch_device(device: DeviceSpec) -> torch.device:
    if device.kind == "gpu":
        return torch.device("cuda", device.index)
    return torch.device("cpu")


class EagerBackend(Backend):
    name = "eager"
    device_kinds = ("cpu", "gpu", "npu")

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        dtype = getattr(torch, options.dtype) if options.dtype else None
        ep = export_unit(unit, dtype)
        torch.export.save(ep, out_dir / "program.pt2")
        return Manifest(
            backend=self.name,
            key="",
            target=self.target(device, options),
            device_kind=device.kind,
            inputs=unit.inputs,
            outputs=unit.outputs,
            versions=self.versions(),
            files=hash_files(out_dir, ["program.pt2"]),
            emulated=device.kind == "npu",
        )

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        # torch.export.load reads a program and its weights; it never unpickles code.
        ep = torch.export.load(artifact.path / "program.pt2")
        dev = torch_device(device)
        mod = ep.module().to(dev)

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                # an activation may be a tuple (a multi-output op cut from its getitems)
                return tuple(mod(*pytree.tree_map(lambda a: a.to(dev), acts)))

        return run
