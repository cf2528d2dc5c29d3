"""Let a program's `view`s copy where the strides it meets differ from the ones it was
traced with, for programs run op by op on another device than they were traced on.

torch.export records `x.transpose(1, 2).contiguous().view(...)` as a bare `view` when the
transposed value was already contiguous in the trace, and whether it is depends on the
kernel that made `x`. hetero traces on the host CPU, whose attention kernel returns its
output laid out [batch, seq, heads, dim]; on an H200 the attention kernel chosen for a
16-row prefill with a mask returned it [batch, heads, seq, dim], and the 7B's prefill
stopped at the `view` before `o_proj` ("view size is not compatible with input tensor's
size and stride"; batch 1 ran, its batch dim of 1 is free to sit anywhere). `reshape` is
that view wherever the view is possible (same aliasing, no copy) and a copy where it is
not: what the elided `contiguous` would have made.

Only for op-by-op runs: Inductor traces again on the device (its own strides), and
compilers that take the exported program lay their values out themselves.
"""

from __future__ import annotations

import torch
from torch import fx

_aten = torch.ops.aten


def reshape_views(gm: fx.GraphModule) -> int:
    """Rewrites `gm`'s `aten.view` calls as `aten.reshape` in place; returns how many."""
    changed = 0
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == _aten.view.default:
            node.target = _aten.reshape.default
            changed += 1
    if changed:
        gm.recompile()
    return changed
