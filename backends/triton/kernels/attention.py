"""The attention template: scaled_dot_product_attention as one flash-style kernel.

Online softmax over key blocks (exp2 with log2(e) folded into the scale), causal masking
with the top-left alignment torch uses, and an optional boolean or additive mask read
through broadcast strides. Grouped-query attention (`enable_gqa`, H query heads over Hk
key/value heads) maps query head h to key/value head h // (H / Hk) when it loads a block,
so keys and values are never repeated in memory. The output is laid out (B, M, H, D) and
returned as a (B, H, M, D) view, as torch's fused kernels do, so the usual permute+view
after attention stays a view.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import Group, dtype, shape
from hetero.backends.triton.kernels.ops import dot_upcast

aten = torch.ops.aten

CANDIDATES = (  # (BLOCK_M, BLOCK_N, num_warps, num_stages)
    (128, 64, 4, 3),
    (128, 64, 8, 3),
    (64, 64, 4, 3),
    (128, 128, 8, 3),
    (64, 32, 4, 2),
)


def as_cfg(c: tuple[int, ...]) -> dict:
    return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), c, strict=True))


def default_cfg(interpret: bool) -> dict:
    return as_cfg((32, 32, 1, 1) if interpret else (128, 64, 4, 3))


KERNEL = """@triton.jit
def {name}(Q, K, V, Mask, O, qk_scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sob, soh, som, sod,
        H: tl.constexpr, REP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
        BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, MASK_KIND: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // REP
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < M) & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_M,), 0.0, tl.float32)
    acc = tl.full((BLOCK_M, BLOCK_D), 0.0, tl.float32)
    if CAUSAL:
        hi = tl.minimum(N, (pid_m + 1) * BLOCK_M)
    else:
        hi = N
    for start in range(0, hi, BLOCK_N):
        offs_n = start + offs_n0
        nmask = offs_n < N
        k = tl.load(K + b * skb + hk * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q{up}, k{up}{precision}) * qk_scale
        keep = nmask[None, :]
        if CAUSAL:
            keep = keep & (offs_m[:, None] >= offs_n[None, :])
        if MASK_KIND != 0:
            mptr = Mask + b * smb + h * smh + offs_m[:, None] * smm + offs_n[None, :] * smn
            mval = tl.load(mptr, mask=(offs_m[:, None] < M) & nmask[None, :], other=0)
            if MASK_KIND == 1:
                keep = keep & (mval != 0)
            else:
                s = s + mval.to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(V + b * svb + hk * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype){up}, v{up}{precision})
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :] * sod,
             acc.to(O.dtype.element_ty), mask=(offs_m[:, None] < M) & dmask[None, :])
"""


@dataclass(frozen=True)
class Sdpa:
    """One scaled_dot_product_attention node's operands and sizes."""

    q: Node
    k: Node
    v: Node
    mask: Node | None
    causal: bool
    scale: float  # the softmax scale (1/sqrt(D) unless given)
    b: int
    h: int  # query heads
    hk: int  # key/value heads (h with enable_gqa unset)
    m: int  # queries
    n: int  # keys
    d: int

    @property
    def rep(self) -> int:
        return self.h // self.hk


def sdpa(node: Node) -> Sdpa:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False))
    b, h, m, d = shape(q)
    hk, n = shape(k)[1], shape(k)[2]
    scale = node.kwargs.get("scale")
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    return Sdpa(q, k, v, mask, causal, scale, b, h, hk, m, n, d)


def mask_kind(mask: Node | None) -> int:
    """0: no mask, 1: boolean (keep where true), 2: additive."""
    return 0 if mask is None else (1 if dtype(mask) == torch.bool else 2)


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    a = sdpa(group.anchor)
    q, k, v, mask, causal, scale = a.q, a.k, a.v, a.mask, a.causal, a.scale
    b, h, m, d, n = a.b, a.h, a.m, a.d, a.n
    block_d = max(16, 1 << (d - 1).bit_length())
    precision = ', input_precision="ieee"' if dtype(q) == torch.float32 else ""
    kernel = KERNEL.format(name=name, precision=precision, up=dot_upcast(dtype(q)))
    kind = mask_kind(mask)
    mask_line = (
        "    Mask, ms = q, (0, 0, 0, 0)\n"
        if mask is None
        else f"    Mask = mask\n    ms = mask.expand({(b, h, m, n)}).stride()\n"
    )
    params = "q, k, v, mask" if mask is not None else "q, k, v"
    launcher = f"""CFG_{name} = {cfg!r}


def launch_{name}({params}, cfg=None):
    cfg = cfg or CFG_{name}
    o = torch.empty(({b}, {m}, {h}, {d}), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
{mask_line}    grid = (triton.cdiv({m}, cfg["BLOCK_M"]), {b * h})
    {name}[grid](q, k, v, Mask, o, {scale * 1.4426950408889634!r},
        *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(),
        H={h}, REP={a.rep}, M={m}, N={n}, D={d}, BLOCK_D={block_d}, CAUSAL={causal}, MASK_KIND={kind},
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return (o,)
"""
    values = [q, k, v] + ([mask] if mask is not None else [])
    return kernel, launcher, values
