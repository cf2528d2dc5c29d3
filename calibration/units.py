"""The microbenchmarks of a compiling backend: small modules shaped like the groups the
planner places (a Linear, a standalone GELU, a LayerNorm, an attention core with its head
split and merge, an embedding lookup, whole transformer blocks), captured once and cut into
CompileUnits (`prepare_units`) that every device and backend shares."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hetero.backends.units import units_for
from hetero.calibration.fit import BLOCK, CALL
from hetero.partitioner.cost import fused_terms
from hetero.partitioner.graph import capture


@dataclass(frozen=True)
class Unit:
    """One compiled microbenchmark: a module shaped like a group the planner places."""

    op_class: str  # the class it measures (its one kernel of that class)
    label: str
    module: object  # torch.nn.Module
    inputs: tuple  # example inputs


def unit_modules(quick: bool, dtype: torch.dtype) -> list[Unit]:
    """Microbenchmarks for a compiling backend. Shapes: small transformers on a CPU (the
    demo's tiny_gpt: 64 tokens x 128 wide, 4 heads) up to a few ms per call, so that a quiet
    round exists on a shared machine; `quick` keeps a few per class (for tests)."""
    nn, F = torch.nn, torch.nn.functional

    class Linear(nn.Module):
        def __init__(self, k, n, bias=True):
            super().__init__()
            self.fc = nn.Linear(k, n, bias=bias)

        def forward(self, x):
            return self.fc(x)

    class Gelu(nn.Module):
        def forward(self, x):
            return F.gelu(x, approximate="tanh")

    class Add(nn.Module):
        def forward(self, x, y):
            return x + y

    class Norm(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.ln = nn.LayerNorm(c)

        def forward(self, x):
            return self.ln(x)

    class Softmax(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1)

    class Attention(nn.Module):
        """Causal SDPA between a qkv projection and the output projection: heads split
        from one [B, T, 3C] tensor and merged back, an attention group as the planner
        sees one (views and SDPA, nothing an NPU rejects)."""

        def __init__(self, heads):
            super().__init__()
            self.heads = heads

        def forward(self, qkv):
            b, t, c3 = qkv.shape
            c = c3 // 3
            q, k, v = qkv.split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return y.transpose(1, 2).reshape(b, t, c)

    class Block(nn.Module):
        """A pre-LN transformer block: the whole-partition check (see `BLOCK`)."""

        def __init__(self, dim, heads):
            super().__init__()
            self.heads = heads
            self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            self.fc, self.out = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

        def forward(self, x):
            b, t, c = x.shape
            q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
            q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
            return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))

    class Lookup(nn.Module):
        def __init__(self, rows, dim):
            super().__init__()
            self.table = nn.Embedding(rows, dim)

        def forward(self, idx):
            return self.table(idx)

    def r(*shape):
        return torch.randn(*shape, dtype=dtype)

    units: list[Unit] = []
    # (tokens, in, out, bias): the demo's qkv/proj/fc/proj/head, then larger
    mm = [(64, 128, 384, True), (64, 128, 128, True), (64, 128, 512, True), (64, 512, 128, True)]
    mm += [(64, 128, 512, False)] if not quick else []
    mm += [(256, 256, 1024, True), (128, 768, 768, True), (512, 512, 512, True)]
    if quick:
        mm = mm[:2] + mm[-1:]
    for t, k, n, bias in mm:
        units.append(
            Unit("matmul", f"linear {t}x{k}->{n}", Linear(k, n, bias).eval(), (r(1, t, k),))
        )
    for t, c in [(64, 512), (256, 1024), (512, 3072)][: 2 if quick else 3]:
        units.append(Unit("transcendental", f"gelu(tanh) {t}x{c}", Gelu(), (r(1, t, c),)))
    for t, c in [(64, 128), (256, 1024), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("elementwise", f"add {t}x{c}", Add(), (r(1, t, c), r(1, t, c))))
    for t, c in [(64, 128), (256, 768), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("norm", f"layer_norm {t}x{c}", Norm(c).eval(), (r(1, t, c),)))
    for t, c in [(64, 256), (512, 768), (1024, 1024)][: 2 if quick else 3]:
        units.append(Unit("reduction", f"softmax {t}x{c}", Softmax(), (r(1, t, c),)))
    att = [(1, 4, 64, 32), (1, 8, 128, 64), (2, 12, 128, 64)]
    for b, h, t, d in att[: 2 if quick else 3]:
        units.append(
            Unit("attention", f"sdpa {b}x{h}x{t}x{d}", Attention(h), (r(b, t, 3 * h * d),))
        )
    for rows, dim, n in [(512, 128, 64), (128, 128, 64), (4096, 256, 512)][: 2 if quick else 3]:
        idx = torch.randint(0, rows, (1, n))
        units.append(Unit("data", f"embedding {n} of {rows}x{dim}", Lookup(rows, dim), (idx,)))
    for t, c in [(64, 128), (128, 256)]:
        units.append(
            Unit(BLOCK, f"transformer block {t}x{c}, 4 heads", Block(c, 4).eval(), (r(1, t, c),))
        )
    return units


def _trivial() -> torch.nn.Module:
    class PlusOne(torch.nn.Module):
        def forward(self, x):
            return x + 1

    return PlusOne()


@dataclass(frozen=True)
class Prepared:
    """A microbenchmark captured and cut into its CompileUnit: the same for every device."""

    unit: Unit
    ops: tuple  # its OpNodes
    terms: object  # cost.FusedTerms: what the cost model prices it by
    groups: object  # its coarse groups (partitioner.coarsen.GroupGraph)
    compile_unit: object  # backends.base.CompileUnit
    env: dict  # example values by name


def prepare_units(*, quick: bool = False, dtype: str = "float32") -> list[Prepared]:
    """Capture the compiled-backend microbenchmarks once (torch.export takes ~1 s each), the
    partition-call unit first; `calibrate` shares them across devices and backends."""
    tdtype = getattr(torch, dtype)
    call = Unit(CALL, "x + 1 (one element)", _trivial(), (torch.ones(1, dtype=tdtype),))
    out = []
    # Fixed weights: the artifact key hashes them, and equal keys let re-calibration reuse
    # the cache. fork_rng leaves the caller's random state as it was.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        units = [call, *unit_modules(quick, tdtype)]
    for u in units:
        graph = capture(u.module, u.inputs)
        ops = tuple(graph[n] for n in graph.order)
        groups = graph.coarsen(depth=0)  # the whole module: one group, priced as one
        terms = fused_terms(groups.groups[0], ops)
        _, cunits, env = units_for(graph, dict.fromkeys(graph.order, 0), *u.inputs)
        # named for error messages (the name is not part of the artifact key)
        unit = replace(cunits[0], name=f"calibration {u.label}")
        out.append(Prepared(u, ops, terms, graph.coarsen(), unit, env))
    return out
