"""The weights beside the library, not inside it.

The CPU pipeline (lower.py) binds a partition's weights as Relax constants so that every
pass sees them: FoldConstant precomputes transposes and casts once, and the oneDNN and BLAS
dispatch (linear.py, dispatch.py) match on constant weights. Left in the module, though,
those constants travel through `export_library`, which serialises them into the VM
executable, packs that blob into an LLVM object and links it, and through `load_module`,
which parses the blob again: for GPT-2 small (475 MB of float32) the library took 23.7 s of
a 33 s TVM compile and 3.6-6.7 s to load on the 2-core box.

So after the last pass that reads them, `lift_constants` turns every large constant of
`main` into a parameter of `main` (after the activations), in the form the passes left it
(transposed, cast), and the artifact keeps those tensors in a safetensors file that a load
maps and hands to every call. Small constants (scalars, masks, biases) stay in the library:
they cost the library nothing and each argument a call passes costs the FFI a little.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

PARAMS = "params.safetensors"
ALIGNMENT = 64  # bytes: what TVM's DLPack import asks of a tensor's data
# Constants at least this large leave the library (a GPT-2 weight is 2.3-9.4 MB): smaller
# ones cost the library little, and each lifted one is an argument of every call.
LIFT_MIN_BYTES = 1 << 20
# dtypes a safetensors file and DLPack both carry as they are
_LIFTED_DTYPES = frozenset({"float32", "float16", "bfloat16", "float64", "int64", "int32"})


def lift_constants(mod: Any, min_bytes: int | None = None) -> tuple[Any, tuple[Any, ...]]:
    """(`mod` with `main`'s constants of at least `min_bytes` (default LIFT_MIN_BYTES) as
    trailing parameters, their values in parameter order). A constant used twice becomes
    one parameter."""
    import tvm  # optional (hetero[tvm]): loaded on first use
    from tvm import relax  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.relax.expr_functor import PyExprMutator, mutator

    min_bytes = LIFT_MIN_BYTES if min_bytes is None else min_bytes
    main = next((gv for gv in mod.functions if gv.name_hint == "main"), None)
    if main is None or not isinstance(mod[main], relax.Function):
        return mod, ()

    @mutator
    class Lift(PyExprMutator):
        def __init__(self, module) -> None:
            super().__init__(module)
            self.params: dict[Any, Any] = {}  # constant -> the parameter that replaces it

        def visit_generic_const_(self, op):
            if not _worth_lifting(op.ty, min_bytes):
                return op
            var = self.params.get(op)
            if var is None:
                var = relax.Var(f"weight{len(self.params)}", op.ty)
                self.params[op] = var
            return var

    func = mod[main]
    lift = Lift(mod)
    body = lift.visit_expr(func.body)
    if not lift.params:
        return mod, ()
    params = list(func.params) + list(lift.params.values())
    mod[main] = relax.Function(params, body, func.ret_ty, func.is_pure, func.attrs)
    values = tuple(c.value for c in lift.params)
    assert all(isinstance(v, tvm.runtime.Tensor) for v in values)
    return mod, values


def _worth_lifting(ty: Any, min_bytes: int) -> bool:
    shape = getattr(ty, "shape", None)
    dtype = str(getattr(ty, "dtype", ""))
    if shape is None or dtype not in _LIFTED_DTYPES:
        return False
    try:
        numel = 1
        for d in shape:
            numel *= int(d)
    except TypeError:  # a symbolic dim: not a weight
        return False
    return numel * getattr(torch, dtype).itemsize >= min_bytes


def save_params(values: Sequence[Any], path: Path) -> None:
    """Write the lifted constants (TVM tensors) to `path`, in parameter order."""
    tensors: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for i, v in enumerate(values):
        t = torch.from_dlpack(v)
        storage = t.untyped_storage().data_ptr()
        if storage in seen or not t.is_contiguous():  # safetensors stores no aliases
            t = t.clone(memory_format=torch.contiguous_format)
            storage = t.untyped_storage().data_ptr()
        seen.add(storage)
        tensors[_name(i)] = t
    save_file(tensors, str(path), metadata={"count": str(len(values))})


def load_params(path: Path, count: int, device: torch.device) -> list[torch.Tensor]:
    """The `count` lifted constants saved at `path`, on `device`, in parameter order."""
    with safe_open(str(path), framework="pt", device=str(device)) as f:
        names = set(f.keys())
        missing = [_name(i) for i in range(count) if _name(i) not in names]
        if missing or len(names) != count:
            raise ValueError(
                f"{path} holds {len(names)} weights where the library takes {count} "
                f"(missing {missing[:3]}); delete the artifact and compile again"
            )
        # One at a time: TVM takes only 64-byte aligned data and a safetensors file aligns
        # its tensors to 8, so most are copied, and the file's copy of each goes at once.
        return [_aligned(f.get_tensor(_name(i))) for i in range(count)]


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % ALIGNMENT == 0 else t.clone()


def _name(i: int) -> str:
    return f"weight{i:05d}"
