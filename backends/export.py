"""Turn a CompileUnit back into a self-contained module / ExportedProgram (weights inside).

Backends that consume torch.export programs (TVM's Relax frontend, the eager reference's
`.pt2` artifact) start from here.
"""

from __future__ import annotations

import copy
import threading
from pathlib import Path
from typing import Any
from unittest import mock

import sympy
import torch
from torch._export.serde import serialize as serde  # its self-check skipped: export_save
from torch.utils import _pytree as pytree

from hetero.backends.base import CompileUnit


class UnitModule(torch.nn.Module):
    """Calls the partition's GraphModule with its parameters held as buffers."""

    def __init__(
        self,
        unit: CompileUnit,
        dtype: torch.dtype | None = None,
        sizes: frozenset[int] = frozenset(),
    ) -> None:
        super().__init__()
        self.gm = unit.module
        self._sizes = sizes  # inputs that arrive as size carriers (see size_carrier)
        self._names = []
        for i, name in enumerate(unit.params):
            t = unit.param_values[name].detach()
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            attr = f"w{i}"
            self.register_buffer(attr, t.clone())
            self._names.append(attr)

    def forward(self, *acts: torch.Tensor):
        if self._sizes:
            acts = tuple(a.shape[0] if i in self._sizes else a for i, a in enumerate(acts))
        out = self.gm(*acts, *[getattr(self, n) for n in self._names])
        return tuple(out)


def save_program(
    ep: torch.export.ExportedProgram,
    path: Path | str,
    *,
    weights_as_inputs: bool,
    unit: CompileUnit | None = None,
) -> None:
    """torch.export.save, without the example inputs when the program takes its weights as
    inputs (streamed pieces, a generation's bound stages): the archive would otherwise hold
    a second copy of every weight (`sample_inputs/model.pt`: 1.6 GB for one stage of a 7B
    model's layers), written at compile and read back at every load. Nothing that loads such
    a program calls it on its examples. A `unit` sharing its exports saves one of them once
    for every backend (`SharedExports.saved_file`)."""
    if weights_as_inputs:
        # a shallow copy: `ep` may be shared with other backends (SharedExports), whose own
        # save or load still wants its examples
        saved = copy.copy(ep)
        saved.example_inputs = None
    else:
        saved = ep
    if unit is None or unit.exports is None:
        export_save(saved, path)
        return
    # keyed by the program object itself (held by the key: its id is never reused)
    unit.exports.saved_file(
        ("program", ep, weights_as_inputs), Path(path), lambda p: export_save(saved, p)
    )


def export_save(ep: torch.export.ExportedProgram, path: Path | str) -> None:
    """torch.export.save without its self-check of the canonical form: its serializer
    canonicalises a deep copy of the program it has just serialised, only to test that this
    is defined, and throws the copy away (`ExportedProgramSerializer.serialize`, torch 2.11
    and 2.13: "Test canonical form is well defined"). That check was 9.0 of the 13.1 s a
    22-layer LLaMA's two generation programs took to save on the 2-core box, and ~17 s of a
    1.1B's compile on an H100 host, all of it before their Inductor compiles could start
    (backend_suite.md, run 47). What is written is the same; where torch has no such check
    (another version), the save is torch's own."""
    if not hasattr(serde, "canonicalize"):
        torch.export.save(ep, path)
        return
    with _LOCK, mock.patch.object(serde, "canonicalize", _kept_as_is):
        torch.export.save(ep, path)


def _kept_as_is(ep: Any, constants: Any = None) -> Any:
    return ep


# one patched save at a time: the patch is the module's, seen by every thread
_LOCK = threading.Lock()


def built_program(unit: CompileUnit) -> torch.export.ExportedProgram | None:
    """The program a backend made of `unit` while it shared its exports, when it made exactly
    one (then the one its artifact holds), without its examples (they may be a copy of the
    weights); None otherwise. The process that built the artifact runs it from here instead
    of reading back the file it has just written (torch.export.load: ~0.5 s a program of a
    tiny LLaMA's on the 2-core box)."""
    if unit.exports is None:
        return None
    made = [m[0] if isinstance(m, tuple) else m for m in unit.exports.made()]
    programs = [m for m in made if isinstance(m, torch.export.ExportedProgram)]
    if len(programs) != 1:
        return None
    program = copy.copy(programs[0])  # shallow, as save_program's: the examples dropped
    program.example_inputs = None
    return program


def runnable(ep: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """`ep` as a module to call on the hot path: without torch.export's check of every input
    against the program's constraints at every call. A stage's inputs come from the runtime,
    after the request was checked at the edge; the check walked every input (the weights
    too, where they are inputs) and took ~25% of a small LM's decode step on the CPU
    (Qwen2-shaped, 2 layers: 0.28 of 1.3 ms per token)."""
    mod = ep.module()
    if hasattr(mod, "validate_inputs"):  # torch's own switch for callers that validate
        mod.validate_inputs = False
    return mod


def size_carrier(n: int) -> torch.Tensor:
    """An empty tensor of shape (n, 0): a size as a tensor dim, for importers (TVM's) that
    take tensors only. It holds no data, so handing it over costs nothing."""
    return torch.empty((n, 0))


def export_unit(
    unit: CompileUnit, dtype: torch.dtype | None = None, carry_sizes: bool = False
) -> torch.export.ExportedProgram:
    """torch.export of the unit (dynamic dims kept when the unit names them); the unit's
    `SharedExports` program when it has one (then shared: do not change it).

    `carry_sizes`: inputs that are sizes computed upstream (SymInts crossing the cut) are
    taken as `size_carrier` tensors whose dim 0 is the size, instead of as ints."""
    sizes = frozenset(i for i, d, _ in unit.dynamic_dims if d < 0) if carry_sizes else frozenset()
    if unit.exports is None:
        return _export_unit(unit, dtype, sizes)
    # keyed by the sizes carried, not the flag: with none to carry, TVM's export (carry_sizes)
    # is the same program as eager's and inductor's
    return unit.exports.get(("unit", dtype, sizes), lambda: _export_unit(unit, dtype, sizes))


def _export_unit(
    unit: CompileUnit, dtype: torch.dtype | None, sizes: frozenset[int]
) -> torch.export.ExportedProgram:
    mod = UnitModule(unit, dtype, sizes).eval()
    inputs = pytree.tree_map(
        lambda t: (
            t.to(dtype)
            if dtype is not None and isinstance(t, torch.Tensor) and t.is_floating_point()
            else t
        ),
        tuple(unit.example_inputs),
    )
    inputs = tuple(size_carrier(int(t)) if i in sizes else t for i, t in enumerate(inputs))
    dynamic = dynamic_spec(unit, len(inputs), sizes)
    with torch.no_grad():
        return torch.export.export(mod, inputs, dynamic_shapes=dynamic, strict=False)


def dynamic_spec(unit: CompileUnit, n_args: int, sizes: frozenset[int] = frozenset()):
    """export's dynamic_shapes for a module whose forward(*args) takes the unit's inputs
    first (then `n_args - len(inputs)` more, static): None when nothing is dynamic."""
    if not unit.dynamic_dims:
        return None
    dims: dict[str, torch.export.Dim] = {}
    spec: list = [None] * n_args
    # Tensor dims first: a size's expression refers to their symbols.
    for idx, dim, sym in sorted(unit.dynamic_dims, key=lambda e: e[1] < 0):
        if dim < 0:
            # A size handed over from upstream: as a size carrier, its expression over the
            # tensors' dims; as a plain int, export relates it itself.
            spec[idx] = {0: _derived_dim(sym, dims)} if idx in sizes else torch.export.Dim.DYNAMIC
            continue
        d = dims.setdefault(sym, torch.export.Dim(f"d_{sym}", min=1))
        spec[idx] = {**(spec[idx] or {}), dim: d}
    return (tuple(spec),)  # forward(*args): export sees one tuple-valued argument


def _derived_dim(expr: str, dims: dict[str, torch.export.Dim]):
    """`a*s + b` over a tensor dim's symbol `s` as a derived export Dim; AUTO otherwise
    (export then works the relation out itself, or says what it could not relate)."""

    try:
        e = sympy.sympify(expr)
    except (sympy.SympifyError, TypeError):
        return torch.export.Dim.AUTO
    if len(e.free_symbols) != 1:
        return torch.export.Dim.AUTO
    (s,) = e.free_symbols
    root = dims.get(str(s))
    poly = sympy.Poly(e, s)
    if root is None or poly.degree() != 1:
        return torch.export.Dim.AUTO
    a, b = (int(c) for c in poly.all_coeffs())
    return root if (a, b) == (1, 0) else a * root + b
