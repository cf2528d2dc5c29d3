"""Turn a CompileUnit back into a self-contained module / ExportedProgram (weights inside).

Backends that consume torch.export programs (TVM's Relax frontend, the eager reference's
`.pt2` artifact) start from here.
"""

from __future__ import annotations

import torch
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileUnit


class UnitModule(torch.nn.Module):
    """Calls the partition's GraphModule with its parameters held as buffers."""

    def __init__(self, unit: CompileUnit, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.gm = unit.module
        self._names = []
        for i, name in enumerate(unit.params):
            t = unit.param_values[name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            attr = f"w{i}"
            self.register_buffer(attr, t.clone())
            self._names.append(attr)

    def forward(self, *acts: torch.Tensor):
        out = self.gm(*acts, *[getattr(self, n) for n in self._names])
        return tuple(out)


def export_unit(
    unit: CompileUnit, dtype: torch.dtype | None = None
) -> torch.export.ExportedProgram:
    """torch.export of the unit (dynamic dims kept when the unit names them)."""
    mod = UnitModule(unit, dtype).eval()
    inputs = pytree.tree_map(
        lambda t: (
            t.to(dtype)
            if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point()
            else t
        ),
        tuple(unit.example_inputs),
    )
    dynamic = None
    if unit.dynamic_dims:
        dims: dict[str, torch.export.Dim] = {}
        spec: list[dict[int, torch.export.Dim] | None] = [None] * len(inputs)
        for idx, dim, sym in unit.dynamic_dims:
            if dim < 0:
                # A size computed upstream and handed over as an int (a SymInt crossing the
                # cut): export relates it to the tensors' dims itself.
                spec[idx] = torch.export.Dim.AUTO
                continue
            d = dims.setdefault(sym, torch.export.Dim(f"d_{sym}", min=1))
            spec[idx] = {**(spec[idx] or {}), dim: d}
        dynamic = (tuple(spec),)  # forward(*acts): export sees one tuple-valued argument
    with torch.no_grad():
        return torch.export.export(mod, inputs, dynamic_shapes=dynamic, strict=False)
