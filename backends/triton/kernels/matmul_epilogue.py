"""The matmul template: mm / addmm / bmm with the group's elementwise epilogue in registers.

A gated group (a SwiGLU / GeGLU MLP: act(x @ Wg) * (x @ Wu)) runs both matmuls in one
kernel: each A tile is loaded once and multiplied into two accumulators, and only the
gated product is written — the up projection never goes to memory.

A and B are read through their strides (compile-time constants, so Triton vectorises the
contiguous dim); tiles are swizzled in groups of GROUP_M rows for L2 reuse; the epilogue
(bias, activation, residual add, cast) runs on the fp32 accumulator before one store.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import Group, dtype, numel, shape
from hetero.backends.triton.kernels.body import (
    Body,
    Space,
    indent,
    launch_args,
    launch_prelude,
    operand_sig,
)
from hetero.backends.triton.kernels.ops import const, dot_upcast

aten = torch.ops.aten

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, GROUP_M) candidates for autotuning.
CANDIDATES = (
    (128, 128, 64, 8, 3, 8),
    (128, 256, 64, 8, 3, 8),
    (256, 128, 64, 8, 3, 8),
    (128, 256, 64, 8, 4, 8),
    (128, 128, 64, 8, 4, 8),
    (128, 128, 64, 4, 4, 8),
    (128, 64, 64, 4, 4, 8),
    (64, 128, 64, 4, 4, 8),
    (64, 64, 64, 4, 4, 8),
    (64, 64, 128, 4, 3, 8),
    (32, 64, 128, 4, 4, 8),
    (16, 64, 128, 4, 4, 8),
    (32, 32, 128, 4, 4, 8),
    (16, 32, 256, 4, 3, 8),
)


def as_cfg(c: tuple[int, ...]) -> dict:
    keys = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "GROUP_M")
    return dict(zip(keys, c, strict=True))


def default_cfg(m: int, n: int, k: int, interpret: bool) -> dict:
    if interpret:  # few, big programs: the interpreter's cost is per program
        return as_cfg((32, 32, 32, 1, 1, 8))
    if m <= 64:
        return as_cfg((32, 64, 128, 4, 4, 8))
    return as_cfg((128, 128, 64, 8, 3, 8))


def operands(node: Node) -> tuple[Node, Node, Node | None]:
    if node.target is aten.addmm.default:
        return node.args[1], node.args[2], node.args[0]
    return node.args[0], node.args[1], None


def partner(group: Group) -> Node | None:
    """The second matmul of a gated group (same A, its own B), or None."""
    if group.kind != "gated":
        return None
    return next((n for n in group.nodes[1:] if n.target is aten.mm.default), None)


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    """One matmul, or two sharing A (a gated MLP's gate and up projections: `acc` and
    `acc2` from one pass over A), with the group's elementwise epilogue."""
    mm = group.anchor
    mm2 = partner(group)
    a, b, bias = operands(mm)
    b2 = mm2.args[1] if mm2 is not None else None
    batch, m, n = group.space
    k = shape(a)[-1]
    out_shape = shape(mm)

    def direct(sh: tuple[int, ...], strides) -> str | None:
        if sh != out_shape:
            return None
        if len(sh) == 3:
            return f"bat * {strides[0]} + m2 * {strides[1]} + n2 * {strides[2]}"
        return f"m2 * {strides[0]} + n2 * {strides[1]}"

    body = Body(group, {"full": Space("idx", "mask")}, lambda _n: "full", direct)
    acc = "acc"
    if bias is not None:
        beta = mm.kwargs.get("beta", 1)
        alpha = mm.kwargs.get("alpha", 1)
        bv = body.load(bias, out_shape, "full")
        scaled = acc if alpha == 1 else f"{acc} * {const(alpha)}"
        acc = f"{scaled} + {bv}" if beta == 1 else f"{scaled} + {const(beta)} * {bv}"
        body.emit(f"acc = {acc}")
    body.var[mm] = "acc"
    if mm2 is not None:
        body.var[mm2] = "acc2"
    # An RMSNorm prologue: its mean of squares is the sum `ss` over the A tiles / K; the
    # upcast and square before it are done on each tile in the K loop.
    means = [n for n in group.nodes if n.target is aten.mean.dim]
    skip = {mm2}
    for mean in means:
        body.var[mean] = f"(ss[:, None] / {k}.0)"
        skip |= {mean, mean.args[0], mean.args[0].args[0]}
    for node in group.nodes[1:]:
        if node not in skip:
            body.pointwise(node)
    outs = body.stores()
    bad = [o.value.name for o in outs if numel(o.value) != batch * m * n]
    if bad:  # a per-row value would be stored over the whole tile
        raise ValueError(f"matmul group {mm.name}: outputs {bad} are not {batch}x{m}x{n}")
    ptrs, strides, flags = operand_sig(body.operands, outs)
    sig = ", ".join(x for x in (ptrs, strides, flags) if x)
    precision = ', input_precision="ieee"' if dtype(a) == torch.float32 else ""
    up = dot_upcast(dtype(a))
    big = batch * m * n >= 2**31
    two = mm2 is not None
    b2_param = "B2, " if two else ""
    b2_strides = "\n        SB2_K: tl.constexpr, SB2_N: tl.constexpr," if two else ""
    b2_init = (
        "\n    b2_ptr = B2 + offs_k[:, None] * SB2_K + bn[None, :] * SB2_N"
        "\n    acc2 = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)"
        if two
        else ""
    )
    b2_load = "\n            b2 = tl.load(b2_ptr)" if two else ""
    b2_load_masked = (
        "\n            b2 = tl.load(b2_ptr, mask=offs_k[:, None] < K - kk * BLOCK_K, other=0.0)"
        if two
        else ""
    )
    ss_init = "\n    ss = tl.full((BLOCK_M,), 0.0, tl.float32)" if means else ""
    ss_step = (
        "\n        af = a.to(tl.float32)\n        ss += tl.reduce(af * af, 1, _SUM)"
        if means
        else ""
    )
    b2_step = (
        f"\n        acc2 = tl.dot(a{up}, b2{up}, acc2{precision})\n        b2_ptr += BLOCK_K * SB2_K"
        if two
        else ""
    )
    kernel = f"""@triton.jit
def {name}(A, B, {b2_param}{sig},
        M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
        SA_B: tl.constexpr, SA_M: tl.constexpr, SA_K: tl.constexpr,
        SB_B: tl.constexpr, SB_K: tl.constexpr, SB_N: tl.constexpr,{b2_strides}
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    bat = tl.program_id(1){".to(tl.int64)" if big else ""}
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % gsize
    pid_n = (pid % width) // gsize
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    # Clamp rows/cols of a ragged last tile instead of masking the K loop's loads.
    if M % BLOCK_M == 0:
        am = tl.max_contiguous(tl.multiple_of(offs_m, BLOCK_M), BLOCK_M)
    else:
        am = tl.where(offs_m < M, offs_m, 0)
    if N % BLOCK_N == 0:
        bn = tl.max_contiguous(tl.multiple_of(offs_n, BLOCK_N), BLOCK_N)
    else:
        bn = tl.where(offs_n < N, offs_n, 0)
    a_ptr = A + bat * SA_B + am[:, None] * SA_M + offs_k[None, :] * SA_K
    b_ptr = B + bat * SB_B + offs_k[:, None] * SB_K + bn[None, :] * SB_N
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32){b2_init}{ss_init}
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr){b2_load}
        else:
            a = tl.load(a_ptr, mask=offs_k[None, :] < K - kk * BLOCK_K, other=0.0)
            b = tl.load(b_ptr, mask=offs_k[:, None] < K - kk * BLOCK_K, other=0.0){b2_load_masked}
        acc = tl.dot(a{up}, b{up}, acc{precision})
        a_ptr += BLOCK_K * SA_K
        b_ptr += BLOCK_K * SB_K{b2_step}{ss_step}
    m2 = offs_m[:, None]
    n2 = offs_n[None, :]
    mask = (m2 < M) & (n2 < N)
    idx = bat * (M * N) + m2 * N + n2
{indent(body.lines)}
"""
    names = [f"a{i}" for i in range(len(body.operands))]
    aptrs, astrides, aflags = launch_args(body.operands, outs, names)
    call_args = ", ".join(x for x in (aptrs, astrides, aflags) if x)
    a3 = "A.stride(0)" if len(shape(a)) == 3 else "0"
    b3 = "B.stride(0)" if len(shape(b)) == 3 else "0"
    heads = ["A", "B", "B2"] if two else ["A", "B"]
    b2_args = " SB2_K=sb2[-2], SB2_N=sb2[-1]," if two else ""
    sb2 = "\n    sb2 = B2.stride()" if two else ""
    launcher = f"""CFG_{name} = {cfg!r}


def launch_{name}({", ".join([*heads, *names, "cfg=None"])}):
    cfg = cfg or CFG_{name}
    dev = A.device
{indent(launch_prelude(body.operands, outs))}
    sa, sb = A.stride(), B.stride(){sb2}
    grid = (triton.cdiv({m}, cfg["BLOCK_M"]) * triton.cdiv({n}, cfg["BLOCK_N"]), {batch})
    {name}[grid]({", ".join(heads)}, {call_args},
        M={m}, N={n}, K={k}, SA_B={a3}, SA_M=sa[-2], SA_K=sa[-1], SB_B={b3}, SB_K=sb[-2], SB_N=sb[-1],{b2_args}
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return ({", ".join(o.arg for o in outs)},)
"""
    values = [a, b, *([b2] if two else []), *(o.value for o in body.operands)]
    return kernel, launcher, values
