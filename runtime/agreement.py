"""How far a program's outputs are from a reference's: what makes two programs
equivalent for the measured backend choice (runtime/choice.py, against the eager run) and
for the CPU decode program's choice (runtime/measured_choice.py, against the program that
served)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from hetero.runtime.retype import retype_unit


def tolerance(dtype: torch.dtype) -> float:
    """Largest relative error (norm-wise, against the reference: the eager run, or the program
    that served) a candidate may show."""
    return 1e-3 if dtype in (torch.float32, torch.float64) else 3e-2


def output_error(got: Any, reference: Sequence[Any], dtype: str | None) -> tuple[float, float]:
    """(worst relative error over the outputs, the tolerance it must meet)."""
    got_leaves = pytree.tree_leaves(tuple(got))
    ref_leaves = pytree.tree_leaves(tuple(reference))
    if len(got_leaves) != len(ref_leaves):
        return math.inf, 0.0
    worst, tol = 0.0, tolerance(getattr(torch, dtype) if dtype else torch.float32)
    for g, r in zip(got_leaves, ref_leaves, strict=True):
        if not isinstance(r, torch.Tensor):
            worst = max(worst, 0.0 if g == r else math.inf)
            continue
        if not isinstance(g, torch.Tensor) or tuple(g.shape) != tuple(r.shape):
            return math.inf, tol
        if not r.is_floating_point():
            worst = max(worst, 0.0 if torch.equal(g.cpu(), r.cpu()) else math.inf)
            continue
        tol = max(tol, tolerance(r.dtype))
        worst = max(worst, relative_error(g.detach().double().cpu(), r.detach().double().cpu()))
    return worst, tol


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| over the finite values of the reference `b`; inf where `a` is not
    finite where `b` is, or differs from `b`'s non-finite values (NaN compares false with
    every bound, so a NaN error would have passed any tolerance)."""
    finite = torch.isfinite(b)
    if not torch.equal(torch.isfinite(a), finite):
        return math.inf
    odd = ~finite
    if odd.any() and not torch.equal(a[odd].nan_to_num(0.0), b[odd].nan_to_num(0.0)):
        return math.inf  # an inf of the other sign, or a NaN where the reference is inf
    a, b = a[finite], b[finite]
    return float((a - b).norm()) / (float(b.norm()) or 1.0)


def float32_outputs(unit: Any, dev: torch.device) -> tuple[Any, ...]:
    """A partition's (`CompileUnit`) outputs with its 16-bit float work done in float32 on
    `dev`, each cast back to its own dtype: nearer the exact values than the 16-bit eager
    run, which rounds after every op."""
    wide = retype_unit(unit, torch.float32)
    acts = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in wide.example_inputs]
    params = [wide.param_values[p].to(dev) for p in wide.params]
    with torch.no_grad():
        return tuple(wide.module.to(dev)(*acts, *params))
