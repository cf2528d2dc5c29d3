"""The matmul template: mm / addmm / bmm with the group's elementwise epilogue in registers.

A and B are read through their strides (compile-time constants, so Triton vectorises the
contiguous dim); tiles are swizzled in groups of GROUP_M rows for L2 reuse; the epilogue
(bias, activation, residual add, cast) runs on the fp32 accumulator before one store.
"""

from __future__ import annotations

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import Group, dtype, shape
from hetero.backends.triton.kernels.body import (
    Body,
    Space,
    indent,
    launch_args,
    launch_prelude,
    operand_sig,
)
from hetero.backends.triton.kernels.ops import const

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


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    mm = group.anchor
    a, b, bias = operands(mm)
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
    for node in group.nodes[1:]:
        body.pointwise(node)
    outs = body.stores()
    ptrs, strides, flags = operand_sig(body.operands, outs)
    sig = ", ".join(x for x in (ptrs, strides, flags) if x)
    precision = ', input_precision="ieee"' if dtype(a) == torch.float32 else ""
    big = batch * m * n >= 2**31
    kernel = f"""@triton.jit
def {name}(A, B, {sig},
        M: tl.constexpr, N: tl.constexpr, K: tl.constexpr,
        SA_B: tl.constexpr, SA_M: tl.constexpr, SA_K: tl.constexpr,
        SB_B: tl.constexpr, SB_K: tl.constexpr, SB_N: tl.constexpr,
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
    acc = tl.full((BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for kk in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        if K % BLOCK_K == 0:
            a = tl.load(a_ptr)
            b = tl.load(b_ptr)
        else:
            a = tl.load(a_ptr, mask=offs_k[None, :] < K - kk * BLOCK_K, other=0.0)
            b = tl.load(b_ptr, mask=offs_k[:, None] < K - kk * BLOCK_K, other=0.0)
        acc = tl.dot(a, b, acc{precision})
        a_ptr += BLOCK_K * SA_K
        b_ptr += BLOCK_K * SB_K
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
    launcher = f"""CFG_{name} = {cfg!r}


def launch_{name}({", ".join(["A", "B", *names, "cfg=None"])}):
    cfg = cfg or CFG_{name}
    dev = A.device
{indent(launch_prelude(body.operands, outs))}
    sa, sb = A.stride(), B.stride()
    grid = (triton.cdiv({m}, cfg["BLOCK_M"]) * triton.cdiv({n}, cfg["BLOCK_N"]), {batch})
    {name}[grid](A, B, {call_args},
        M={m}, N={n}, K={k}, SA_B={a3}, SA_M=sa[-2], SA_K=sa[-1], SB_B={b3}, SB_K=sb[-2], SB_N=sb[-1],
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
        GROUP_M=cfg["GROUP_M"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return ({", ".join(o.arg for o in outs)},)
"""
    return kernel, launcher, [a, b, *(o.value for o in body.operands)]
