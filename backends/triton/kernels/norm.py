"""The row template: reductions over the last dim with their producers and consumers.

One program per row holds the whole row in registers (BLOCK_N >= cols), so LayerNorm,
RMSNorm and softmax — with the residual add before them and the cast after — read their
input once and write their outputs once.
"""

from __future__ import annotations

from torch.fx import Node

from hetero.backends.triton.fusion import Group, numel
from hetero.backends.triton.kernels.body import (
    Body,
    Space,
    indent,
    launch_args,
    launch_prelude,
    operand_sig,
)
from hetero.backends.triton.patterns import Reduction


def _pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def default_cfg(cols: int, interpret: bool) -> dict:
    block = _pow2(cols)
    warps = 1 if interpret else min(16, max(1, block // 256))
    return {"num_warps": warps}


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    rows, cols = group.space
    big = rows * cols >= 2**31

    def space_of(n: Node) -> str:
        return "full" if numel(n) == rows * cols else "row"

    body = Body(group, {"full": Space("idx", "cmask"), "row": Space("row", None)}, space_of)
    reductions = set(Reduction.TARGETS)
    for node in group.nodes:
        if node.target in reductions:
            body.row_reduce(node, "cmask", cols)
        else:
            body.pointwise(node)
    outs = body.stores()
    ptrs, strides, flags = operand_sig(body.operands, outs)
    sig = ", ".join(x for x in (ptrs, strides, flags) if x)
    row = "tl.program_id(0).to(tl.int64)" if big else "tl.program_id(0)"
    kernel = (
        f"@triton.jit\ndef {name}({sig}, N: tl.constexpr, BLOCK_N: tl.constexpr):\n"
        f"    row = {row}\n"
        f"    cols = tl.arange(0, BLOCK_N)\n"
        f"    cmask = cols < N\n"
        f"    idx = row * N + cols\n" + indent(body.lines) + "\n"
    )
    names = [f"a{i}" for i in range(len(body.operands))]
    aptrs, astrides, aflags = launch_args(body.operands, outs, names)
    call_args = ", ".join(x for x in (aptrs, astrides, aflags) if x)
    launcher = (
        f"CFG_{name} = {cfg!r}\n\n\n"
        f"def launch_{name}({', '.join([*names, 'cfg=None'])}):\n"
        f"    cfg = cfg or CFG_{name}\n"
        f"    dev = {names[0]}.device\n" + indent(launch_prelude(body.operands, outs)) + "\n"
        f"    {name}[({rows},)]({call_args}, N={cols}, BLOCK_N={_pow2(cols)}, "
        f"num_warps=cfg['num_warps'])\n"
        f"    return ({', '.join(o.arg for o in outs)},)\n"
    )
    return kernel, launcher, [o.value for o in body.operands]
