"""The convolution template: torch's convolution (cuDNN on a GPU) with a Triton epilogue.

The convolution itself runs as `aten.convolution` without its bias; one elementwise kernel
then adds the bias (per output channel) and runs the group's epilogue — the activation,
the residual add, a cast — reading the convolution's output once. Batch-norm was folded
into the weight and bias before fusion (rewrite.py). With channels-last weights (the
backend's `channels_last` option, default for float16/bfloat16) cuDNN runs NHWC and the
epilogue walks its output in memory order (see elementwise.py), writing channels-last for
the next convolution. A convolution with no epilogue is the ATen call alone.
"""

from __future__ import annotations

from hetero.backends.triton.fusion import Group, shape
from hetero.backends.triton.kernels.body import Body, Space, indent, launch_args, operand_sig
from hetero.backends.triton.kernels.elementwise import (
    allocs,
    layout_free,
    store_in_walk_order,
    walk_lines,
)


def default_cfg(interpret: bool, channels_last: bool = False) -> dict:
    """channels_last: the weight is laid out so, and the input is made so (a no-op for the
    output of an epilogue that wrote it channels-last): 1x1 and depthwise weights look the
    same in both layouts, so only the input tells torch which kernel to run."""
    return {"BLOCK": 256 if interpret else 1024, "num_warps": 4, "channels_last": channels_last}


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    conv = group.anchor
    x, w, bias = conv.args[:3]
    rest = ", ".join(repr(a) for a in conv.args[3:])
    frame = shape(conv)
    n = 1
    for s in frame:
        n *= s
    if len(group.nodes) == 1:  # no epilogue: the ATen call, contiguous where a view needs it
        b = "b" if bias is not None else "None"
        fix = "" if layout_free(conv) else ".contiguous()"
        params = "x, w, b" if bias is not None else "x, w"
        launcher = (
            f"CFG_{name} = {cfg!r}\n\n\n"
            f"def launch_{name}({params}, cfg=None):\n"
            f"    cfg = cfg or CFG_{name}\n"
            f"    x = _cl_input(x, cfg)\n"
            f"    return (aten.convolution(x, w, {b}, {rest}){fix},)\n"
        )
        return "", launcher, [x, w, *([bias] if bias is not None else [])]

    idx_t = "tl.int64" if n >= 2**31 else "tl.int32"
    body = Body(group, {"full": Space("idx", "mask", "j")}, lambda _n: "full")
    y = body.load(conv, frame, "full")
    if bias is not None:
        bv = body.load(bias, frame, "full")
        body.emit(f"{y} = {y} + {bv}")
    body.var[conv] = y
    for node in group.nodes[1:]:
        body.pointwise(node)
    pick = store_in_walk_order(frame)
    outs = body.stores(pick)
    ptrs, strides, flags = operand_sig(body.operands, outs)
    sig = ", ".join(x for x in (ptrs, "n_el", strides, flags) if x)
    kernel = (
        f"@triton.jit\ndef {name}({sig}, CL: tl.constexpr, BLOCK: tl.constexpr):\n"
        + indent(walk_lines(frame, idx_t))
        + "\n"
        + indent(body.lines)
        + "\n"
    )

    # Each operand's launcher source: the convolution's result, the bias as (C, 1, 1), or a
    # parameter of the launcher (a value `forward` passes in).
    exprs, extra, extra_values = [], [], []
    for i, o in enumerate(body.operands):
        if o.value is conv:
            exprs.append("y")
        elif bias is not None and o.value is bias and o.shape == frame:
            exprs.append(f"b.view({shape(bias)[0]}, {', '.join(['1'] * (len(frame) - 2))})")
        else:
            exprs.append(f"a{i}")
            extra.append(f"a{i}")
            extra_values.append(o.value)
    names = [f"k{i}" for i in range(len(exprs))]
    aptrs, astrides, aflags = launch_args(body.operands, outs, names, "(_cl if cl else _contig)")
    call_args = ", ".join(x for x in (aptrs, str(n), astrides, aflags) if x)
    params = ["x", "w", *(["b"] if bias is not None else []), *extra, "cfg=None"]
    bind = [f"{nm} = {e}" for nm, e in zip(names, exprs, strict=True)]
    launcher = (
        f"CFG_{name} = {cfg!r}\n\n\n"
        f"def launch_{name}({', '.join(params)}):\n"
        f"    cfg = cfg or CFG_{name}\n"
        f"    y = aten.convolution(_cl_input(x, cfg), w, None, {rest})\n"
        f"    dev = y.device\n"
        f"    cl = _cl(y, {frame})\n"
        + indent(bind)
        + "\n"
        + indent(allocs(outs, pick, frame))
        + "\n"
        f"    grid = (triton.cdiv({n}, cfg['BLOCK']),)\n"
        f"    {name}[grid]({call_args}, CL=cl, BLOCK=cfg['BLOCK'], num_warps=cfg['num_warps'])\n"
        f"    return ({', '.join(o.arg for o in outs)},)\n"
    )
    return kernel, launcher, [x, w, *([bias] if bias is not None else []), *extra_values]
