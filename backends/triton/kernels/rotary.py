"""The rotary template: x * cos + rotate_half(x) * sin for every rotary pattern of a group.

rotate_half swaps the two halves of the last dim and negates the first: element d of the
result reads x at d + D/2 (negated) when d < D/2, else at d - D/2. One program handles
BLOCK consecutive output elements of one pattern; the programs of the query's pattern come
first, then the key's, so both run in one launch. x, cos and sin are read through their
(broadcast) strides — x is usually the permuted output of a projection — and each result is
written contiguous.
"""

from __future__ import annotations

from hetero.backends.triton.fusion import Group, dtype, numel, shape
from hetero.backends.triton.kernels.ops import TL_DTYPE, flat_offset
from hetero.backends.triton.matchers import Rope, rope_at


def default_cfg(interpret: bool) -> dict:
    return {"BLOCK": 256 if interpret else 1024, "num_warps": 4}


def ropes(group: Group) -> list[Rope]:
    found = [rope_at(n) for n in group.outputs]
    if any(r is None for r in found):  # pragma: no cover - the Rotary rule guarantees it
        raise ValueError(f"rotary group {[n.name for n in group.nodes]} has a foreign output")
    return found  # type: ignore[return-value]


def _part(i: int, rope: Rope, start: str) -> list[str]:
    """Kernel lines for pattern i over programs [start, start + its blocks)."""
    xs = shape(rope.x)
    d = xs[-1]
    rows = xs[:-1]
    xs_args = [f"x{i}_s{j}" for j in range(len(xs))]
    cs_args = [f"c{i}_s{j}" for j in range(len(xs))]
    ss_args = [f"s{i}_s{j}" for j in range(len(xs))]
    return [
        f"idx = (pid - {start}) * BLOCK + tl.arange(0, BLOCK)",
        f"mask = idx < {numel(rope.x)}",
        f"d = idx % {d}",
        f"row = idx // {d}",
        f"rot = tl.where(d < {d // 2}, d + {d // 2}, d - {d // 2})",
        f"sign = tl.where(d < {d // 2}, -1.0, 1.0)",
        f"xb = {flat_offset('row', rows, xs_args[:-1])}",
        f"cb = {flat_offset('row', rows, cs_args[:-1])} + d * {cs_args[-1]}",
        f"sb = {flat_offset('row', rows, ss_args[:-1])} + d * {ss_args[-1]}",
        f"x = tl.load(X{i} + xb + d * {xs_args[-1]}, mask=mask, other=0).to(tl.float32)",
        f"xr = tl.load(X{i} + xb + rot * {xs_args[-1]}, mask=mask, other=0).to(tl.float32)",
        f"c = tl.load(C{i} + cb, mask=mask, other=0).to(tl.float32)",
        f"s = tl.load(S{i} + sb, mask=mask, other=0).to(tl.float32)",
        f"tl.store(O{i} + idx, (x * c + sign * xr * s).to({TL_DTYPE[dtype(rope.out)]}), mask=mask)",
    ]


def render(group: Group, name: str, cfg: dict) -> tuple[str, str, list]:
    parts = ropes(group)
    params, strides, body = [], [], []
    blocks = [f"(({numel(r.x)} + BLOCK - 1) // BLOCK)" for r in parts]
    for i, r in enumerate(parts):
        params += [f"X{i}", f"C{i}", f"S{i}", f"O{i}"]
        strides += [f"{t}{i}_s{j}" for t in ("x", "c", "s") for j in range(len(shape(r.x)))]
    for i, r in enumerate(parts):
        lines = _part(i, r, " + ".join(blocks[:i]) or "0")
        if len(parts) == 1:
            body += ["    " + ln for ln in lines]
            continue
        if i == len(parts) - 1:
            head = "    else:"
        else:
            head = f"    {'if' if i == 0 else 'elif'} pid < {' + '.join(blocks[: i + 1])}:"
        body += [head] + ["        " + ln for ln in lines]
    kernel = (
        f"@triton.jit\ndef {name}({', '.join(params + strides)}, BLOCK: tl.constexpr):\n"
        f"    pid = tl.program_id(0)\n" + "\n".join(body) + "\n"
    )
    args = [f"{t}{i}" for i in range(len(parts)) for t in ("x", "c", "s")]
    call = [f"{t}{i}" for i in range(len(parts)) for t in ("x", "c", "s", "o")]
    for i, r in enumerate(parts):
        sh = shape(r.x)
        call += [f"*x{i}.stride()", f"*_bstrides(c{i}, {sh})", f"*_bstrides(s{i}, {sh})"]
    allocs = [
        f"    o{i} = torch.empty({shape(r.out)}, dtype={dtype(r.out)}, device=x0.device)"
        for i, r in enumerate(parts)
    ]
    nblocks = " + ".join(f"triton.cdiv({numel(r.x)}, cfg['BLOCK'])" for r in parts)
    outs = ", ".join(f"o{i}" for i in range(len(parts)))
    launcher = (
        f"CFG_{name} = {cfg!r}\n\n\n"
        f"def launch_{name}({', '.join([*args, 'cfg=None'])}):\n"
        f"    cfg = cfg or CFG_{name}\n" + "\n".join(allocs) + "\n"
        f"    {name}[({nblocks},)]({', '.join(call)}, BLOCK=cfg['BLOCK'], "
        f"num_warps=cfg['num_warps'])\n"
        f"    return ({outs},)\n"
    )
    values = [v for r in parts for v in (r.x, r.cos, r.sin)]
    return kernel, launcher, values
