"""The elementwise template: one kernel over the flat index of a chain of pointwise ops."""

from __future__ import annotations

from hetero.backends.triton.fusion import Group
from hetero.backends.triton.kernels.body import (
    Body,
    Space,
    indent,
    launch_args,
    launch_prelude,
    operand_sig,
)


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    """A kernel over the flat index of the group's values (all of one size)."""
    n = group.space[0]
    idx_t = "tl.int64" if n >= 2**31 else "tl.int32"
    body = Body(group, {"full": Space("idx", "mask")}, lambda _n: "full")
    for node in group.nodes:
        body.pointwise(node)
    outs = body.stores()
    ptrs, strides, flags = operand_sig(body.operands, outs)
    sig = ", ".join(x for x in (ptrs, "n_el", strides, flags) if x)
    kernel = (
        f"@triton.jit\ndef {name}({sig}, BLOCK: tl.constexpr):\n"
        f"    idx = tl.program_id(0).to({idx_t}) * BLOCK + tl.arange(0, BLOCK)\n"
        f"    mask = idx < n_el\n" + indent(body.lines) + "\n"
    )
    names = [f"a{i}" for i in range(len(body.operands))]
    aptrs, astrides, aflags = launch_args(body.operands, outs, names)
    call_args = ", ".join(x for x in (aptrs, str(n), astrides, aflags) if x)
    launcher = (
        f"CFG_{name} = {cfg!r}\n\n\n"
        f"def launch_{name}({', '.join([*names, 'cfg=None'])}):\n"
        f"    cfg = cfg or CFG_{name}\n"
        f"    dev = {names[0] if names else 'None'}.device\n"
        + indent(launch_prelude(body.operands, outs))
        + "\n"
        f"    grid = (triton.cdiv({n}, cfg['BLOCK']),)\n"
        f"    {name}[grid]({call_args}, BLOCK=cfg['BLOCK'], num_warps=cfg['num_warps'])\n"
        f"    return ({', '.join(o.arg for o in outs)},)\n"
    )
    return kernel, launcher, [o.value for o in body.operands]
