"""The decode attention template: a few queries against a long key/value cache, split over keys.

At decode time a query has one token (a few with speculative decoding) and the cache has
thousands: one program per (batch, head) leaves most of the GPU idle. The keys are cut into
SPLIT-long pieces, one program per (batch, key/value head, piece) runs the online softmax
over its piece for every query row that reads that key/value head (all REP query heads of a
grouped-query layer at once, so each key is read once), and a second kernel merges the
pieces' partial results by their log-sum-exp (flash-decoding). With one piece the first
kernel writes the output itself.

A cache is usually longer than what it holds: the mask (built from the valid length) says
which keys count, and the kernel's key and value loads are masked by it, so the rows past
the valid length cost no memory traffic.
"""

from __future__ import annotations

import torch

from hetero.backends.triton.fusion import Group, dtype
from hetero.backends.triton.kernels.attention import mask_kind, sdpa
from hetero.backends.triton.kernels.ops import dot_upcast

CANDIDATES = (  # (SPLIT, BLOCK_N, num_warps, num_stages)
    (128, 64, 4, 2),
    (256, 64, 4, 2),
    (512, 64, 4, 2),
    (256, 128, 4, 2),
    (512, 128, 8, 2),
    (1024, 128, 8, 2),
)


def as_cfg(c: tuple[int, ...]) -> dict:
    return dict(zip(("SPLIT", "BLOCK_N", "num_warps", "num_stages"), c, strict=True))


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def default_cfg(programs: int, n: int, interpret: bool) -> dict:
    """Pieces enough for ~2 programs per SM of a large GPU (132 SMs), each >= 2 blocks long."""
    if interpret:
        return as_cfg((32, 16, 1, 1))
    block = 64
    pieces = max(1, min(_cdiv(264, max(programs, 1)), _cdiv(n, 2 * block)))
    split = _cdiv(_cdiv(n, pieces), block) * block
    return as_cfg((split, block, 4, 2))


KERNEL = """@triton.jit
def {name}(Q, K, V, Mask, O, Pacc, Pm, Pl, qk_scale,
        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
        smb, smh, smm, smn, sob, soh, som, sod,
        HK: tl.constexpr, REP: tl.constexpr, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
        R: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
        MASK_KIND: tl.constexpr, SPLIT: tl.constexpr, PIECES: tl.constexpr,
        BLOCK_N: tl.constexpr):
    piece = tl.program_id(0)
    bg = tl.program_id(1)
    b = bg // HK
    g = bg % HK
    rows = tl.arange(0, BLOCK_R)
    rmask = rows < R
    h = g * REP + rows // M
    mi = rows % M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + b * sqb + h[:, None] * sqh + mi[:, None] * sqm + offs_d[None, :] * sqd,
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    l_i = tl.full((BLOCK_R,), 0.0, tl.float32)
    acc = tl.full((BLOCK_R, BLOCK_D), 0.0, tl.float32)
    lo = piece * SPLIT
    for start in range(0, SPLIT, BLOCK_N):
        offs_n = lo + start + tl.arange(0, BLOCK_N)
        keep = rmask[:, None] & (offs_n[None, :] < N)
        if CAUSAL:
            keep = keep & (mi[:, None] >= offs_n[None, :])
        if MASK_KIND != 0:
            mptr = Mask + b * smb + h[:, None] * smh + mi[:, None] * smm + offs_n[None, :] * smn
            mval = tl.load(mptr, mask=keep, other=0)
            if MASK_KIND == 1:
                keep = keep & (mval != 0)
            else:
                keep = keep & (mval != float("-inf"))
        # A key no query row keeps is not loaded: a cache's unused tail costs no traffic.
        used = tl.reduce(keep.to(tl.int32), 0, _MAX) > 0
        k = tl.load(K + b * skb + g * skh + offs_n[None, :] * skn + offs_d[:, None] * skd,
                    mask=used[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(q{up}, k{up}{precision}) * qk_scale
        if MASK_KIND == 2:
            s = s + mval.to(tl.float32) * 1.4426950408889634
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.reduce(s, 1, _MAX))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.reduce(p, 1, _SUM)
        v = tl.load(V + b * svb + g * svh + offs_n[:, None] * svn + offs_d[None, :] * svd,
                    mask=used[:, None] & dmask[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype){up}, v{up}{precision})
        m_i = m_new
    if PIECES == 1:
        out = acc / l_i[:, None]
        tl.store(O + b * sob + h[:, None] * soh + mi[:, None] * som + offs_d[None, :] * sod,
                 out.to(O.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])
    else:
        part = (bg * PIECES + piece) * BLOCK_R + rows
        tl.store(Pacc + part[:, None] * BLOCK_D + offs_d[None, :], acc)
        tl.store(Pm + part, m_i)
        tl.store(Pl + part, l_i)


@triton.jit
def {name}_merge(Pacc, Pm, Pl, O, sob, soh, som, sod,
        HK: tl.constexpr, REP: tl.constexpr, M: tl.constexpr, D: tl.constexpr,
        BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, PIECES: tl.constexpr,
        BLOCK_P: tl.constexpr):
    bg = tl.program_id(0)
    r = tl.program_id(1)
    b = bg // HK
    h = (bg % HK) * REP + r // M
    mi = r % M
    ps = tl.arange(0, BLOCK_P)
    pmask = ps < PIECES
    offs_d = tl.arange(0, BLOCK_D)
    part = (bg * PIECES + ps) * BLOCK_R + r
    m = tl.load(Pm + part, mask=pmask, other=float("-inf"))
    l = tl.load(Pl + part, mask=pmask, other=0.0)
    mx = tl.reduce(m, 0, _MAX)
    mx = tl.where(mx == float("-inf"), 0.0, mx)
    w = tl.exp2(m - mx)
    total = tl.reduce(w * l, 0, _SUM)
    accs = tl.load(Pacc + part[:, None] * BLOCK_D + offs_d[None, :], mask=pmask[:, None], other=0.0)
    out = tl.reduce(accs * w[:, None], 0, _SUM) / total
    tl.store(O + b * sob + h * soh + mi * som + offs_d * sod, out.to(O.dtype.element_ty),
             mask=offs_d < D)
"""


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    a = sdpa(group.anchor)
    rows = a.m * a.rep  # query rows that read one key/value head
    block_r = max(16, 1 << (rows - 1).bit_length())
    block_d = max(16, 1 << (a.d - 1).bit_length())
    precision = ', input_precision="ieee"' if dtype(a.q) == torch.float32 else ""
    kernel = KERNEL.format(name=name, precision=precision, up=dot_upcast(dtype(a.q)))
    kind = mask_kind(a.mask)
    mask_line = (
        "    Mask, ms = q, (0, 0, 0, 0)\n"
        if a.mask is None
        else f"    Mask = mask\n    ms = mask.expand({(a.b, a.h, a.m, a.n)}).stride()\n"
    )
    params = "q, k, v, mask" if a.mask is not None else "q, k, v"
    bhk = a.b * a.hk
    launcher = f"""CFG_{name} = {cfg!r}


def launch_{name}({params}, cfg=None):
    cfg = cfg or CFG_{name}
    split = max(cfg["BLOCK_N"], min(cfg["SPLIT"], triton.cdiv({a.n}, cfg["BLOCK_N"]) * cfg["BLOCK_N"]))
    pieces = triton.cdiv({a.n}, split)
    o = torch.empty(({a.b}, {a.m}, {a.h}, {a.d}), dtype=q.dtype, device=q.device).permute(0, 2, 1, 3)
{mask_line}    if pieces > 1:
        pacc = torch.empty(({bhk} * pieces * {block_r}, {block_d}), dtype=torch.float32, device=q.device)
        pm = torch.empty(({bhk} * pieces * {block_r},), dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
    else:
        pacc = pm = pl = o
    {name}[(pieces, {bhk})](q, k, v, Mask, o, pacc, pm, pl, {a.scale * 1.4426950408889634!r},
        *q.stride(), *k.stride(), *v.stride(), *ms, *o.stride(),
        HK={a.hk}, REP={a.rep}, M={a.m}, N={a.n}, D={a.d}, R={rows}, BLOCK_R={block_r},
        BLOCK_D={block_d}, CAUSAL={a.causal}, MASK_KIND={kind}, SPLIT=split, PIECES=pieces,
        BLOCK_N=cfg["BLOCK_N"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    if pieces > 1:
        {name}_merge[({bhk}, {rows})](pacc, pm, pl, o, *o.stride(), HK={a.hk}, REP={a.rep},
            M={a.m}, D={a.d}, BLOCK_R={block_r}, BLOCK_D={block_d}, PIECES=pieces,
            BLOCK_P=1 << (pieces - 1).bit_length(), num_warps=4)
    return (o,)
"""
    values = [a.q, a.k, a.v] + ([a.mask] if a.mask is not None else [])
    return kernel, launcher, values
