"""The elementwise template: one kernel over the flat index of a chain of pointwise ops.

A group over image-like values (N, C, *S) walks them in the memory order of its lead
operand (the first one of that shape): row-major, or channels-last when the lead is
channels-last (a convolution's output in NHWC), decided at launch. Operands laid out like
the lead are then read at the walking index (coalesced), others through their strides at
the logical index; outputs that only stride-agnostic ops read are written in the lead's
layout, so a chain of channels-last convolutions never converts back to NCHW.
"""

from __future__ import annotations

import math

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import Group, shape
from hetero.backends.triton.kernels.body import (
    Body,
    Output,
    Space,
    indent,
    launch_args,
    operand_sig,
)

aten = torch.ops.aten

# Views that accept any strides (their readers decide); `view` itself needs compatible ones.
_STRIDED_VIEWS = {
    aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims,
    aten.squeeze.default, aten.slice.Tensor, aten.select.int, aten.alias.default,
    aten.expand.default, aten.transpose.int, aten.t.default,
}  # fmt: skip
_NEEDS_STRIDES = {aten.view.default, aten._unsafe_view.default, aten.as_strided.default}


def frame_of(group: Group) -> tuple[int, ...] | None:
    """The (N, C, *S) shape a group may walk channels-last: its first value's, if 3-5 dims."""
    s = shape(group.nodes[0])
    return s if 3 <= len(s) <= 5 and math.prod(s) > 0 else None


def layout_free(node: Node, depth: int = 4) -> bool:
    """Whether every reader of `node` works on any strides (so it may be channels-last):
    no `view` of it, directly or through other views, and not a graph output."""
    for u in node.users:
        if u.op == "output" or u.target in _NEEDS_STRIDES:
            return False
        if u.target in _STRIDED_VIEWS and (depth == 0 or not layout_free(u, depth - 1)):
            return False
    return True


def walk_lines(frame: tuple[int, ...] | None, idx_t: str) -> list[str]:
    """Kernel lines: `j` the walking index, `idx` the logical one, `mask`."""
    lines = [f"j = tl.program_id(0).to({idx_t}) * BLOCK + tl.arange(0, BLOCK)", "mask = j < n_el"]
    if frame is None:
        return [*lines, "idx = j"]
    c, sp = frame[1], math.prod(frame[2:])
    return [
        *lines,
        "if CL:",
        f"    idx = (j // {c * sp}) * {c * sp} + (j % {c}) * {sp} + (j // {c}) % {sp}",
        "else:",
        "    idx = j",
    ]


def store_in_walk_order(frame: tuple[int, ...] | None) -> object:
    def pick(node: Node) -> bool:
        return frame is not None and shape(node) == frame and layout_free(node)

    return pick


def allocs(outs: list[Output], pick, frame) -> list[str]:
    lines = []
    for o in outs:
        sh, dt = tuple(shape(o.value)), o.value.meta["val"].dtype
        if pick(o.value):
            lines.append(
                f"{o.arg} = _cl_empty({sh}, {dt}, dev) if cl else "
                f"torch.empty({sh}, dtype={dt}, device=dev)"
            )
        else:
            lines.append(f"{o.arg} = torch.empty({sh}, dtype={dt}, device=dev)")
    return lines


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    """A kernel over the flat index of the group's values (all of one size)."""
    n = group.space[0]
    idx_t = "tl.int64" if n >= 2**31 else "tl.int32"
    frame = frame_of(group)
    body = Body(group, {"full": Space("idx", "mask", "j")}, lambda _n: "full")
    for node in group.nodes:
        body.pointwise(node)
    pick = store_in_walk_order(frame)
    outs = body.stores(pick)
    ptrs, strides, flags = operand_sig(body.operands, outs)
    cl_flag = "CL: tl.constexpr, " if frame is not None else ""
    sig = ", ".join(x for x in (ptrs, "n_el", strides, flags) if x)
    kernel = (
        f"@triton.jit\ndef {name}({sig}, {cl_flag}BLOCK: tl.constexpr):\n"
        + indent(walk_lines(frame, idx_t))
        + "\n"
        + indent(body.lines)
        + "\n"
    )
    names = [f"a{i}" for i in range(len(body.operands))]
    lead = next((nm for nm, o in zip(names, body.operands, strict=True) if o.shape == frame), None)
    cl = f"_cl({lead}, {frame})" if frame is not None and lead is not None else "False"
    aptrs, astrides, aflags = launch_args(body.operands, outs, names, "(_cl if cl else _contig)")
    call_args = ", ".join(x for x in (aptrs, str(n), astrides, aflags) if x)
    cl_kw = "CL=cl, " if frame is not None else ""
    launcher = (
        f"CFG_{name} = {cfg!r}\n\n\n"
        f"def launch_{name}({', '.join([*names, 'cfg=None'])}):\n"
        f"    cfg = cfg or CFG_{name}\n"
        f"    dev = {names[0] if names else 'None'}.device\n"
        f"    cl = {cl}\n" + indent(allocs(outs, pick, frame)) + "\n"
        f"    grid = (triton.cdiv({n}, cfg['BLOCK']),)\n"
        f"    {name}[grid]({call_args}, {cl_kw}BLOCK=cfg['BLOCK'], num_warps=cfg['num_warps'])\n"
        f"    return ({', '.join(o.arg for o in outs)},)\n"
    )
    return kernel, launcher, [o.value for o in body.operands]


__all__ = ["allocs", "frame_of", "layout_free", "render", "walk_lines"]
