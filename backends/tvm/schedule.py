"""Default CPU schedules for the fused kernels TVM emits (dlight-style, no tuning).

Untuned, every fused kernel is one serial scalar loop nest. These rules, tried in order
(the first that returns a schedule wins, dlight's convention), make them parallel over the
cores and vectorized:

1. `Injective`: elementwise chains (bias + GELU, residual add, casts, masks): inline into one
   loop nest, fuse it, split off a vector-width inner loop and parallelize the rest.
2. dlight's CPU `Reduction`: softmax / LayerNorm-like (reductions followed by an
   elementwise epilogue over the same rows): rows in parallel, epilogues vectorized.
3. `ParallelOuter` (fallback): any other kernel gets its leading data-parallel loops fused
   and parallelized, which is always legal for spatial loops.

A rule that fails on an unexpected kernel returns None instead of raising, so the kernel
keeps TVM's default (correct, serial) code.
"""

from __future__ import annotations


def cpu_rules() -> list:
    from tvm import s_tir, tirx
    from tvm.s_tir import dlight as dl
    from tvm.s_tir.dlight.analysis import normalize_prim_func
    from tvm.s_tir.dlight.base import ScheduleRule, get_extent, try_inline
    from tvm.target.codegen import llvm_get_vector_width

    def lanes(target, sch, block) -> int:
        bits = llvm_get_vector_width(target)
        stmt = sch.get(block)
        dbits = stmt.writes[0].source.dtype.bits if stmt.writes else 32
        return max((bits if bits > 0 else 128) // max(dbits, 8), 2)

    class Safe(ScheduleRule):
        """Runs a rule and turns its failures into 'not applicable'."""

        def __init__(self, rule) -> None:
            self.rule = rule

        def apply(self, func, target, tunable):
            if not isinstance(func, tirx.PrimFunc) or target.kind.name != "llvm":
                return None
            try:
                return self.rule(func, target)
            except Exception:  # a rule that does not fit this kernel: try the next one
                return None

    def injective(func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        if len(infos) != 1 or not infos[0].is_injective():
            return None
        block = infos[0].block_rv
        loops = sch.get_loops(block)
        if not loops:
            return None
        fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
        vec = lanes(target, sch, block)
        extent = get_extent(sch, fused)
        if isinstance(extent, int) and extent < vec:
            return sch
        outer, inner = sch.split(fused, factors=[None, vec])
        sch.vectorize(inner)
        if not isinstance(extent, int) or extent >= 4096:
            sch.parallel(outer)
        return sch

    reduction = dl.cpu.Reduction()

    def rows(func, target):
        return reduction.apply(func, target, False)

    def parallel_outer(func, target):
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None:
            return None
        infos = try_inline(sch, infos)
        done = False
        for info in infos:
            kinds = info.dom_kind()
            lead = len(kinds) - len(kinds.lstrip("S"))
            loops = sch.get_loops(info.block_rv)
            if lead == 0 or len(loops) != len(kinds):
                continue
            outer = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
            extent = get_extent(sch, outer)
            if isinstance(extent, int) and extent < 2:
                continue
            sch.parallel(outer)
            done = True
        return sch if done else None

    return [Safe(injective), Safe(rows), Safe(parallel_outer)]


def apply_cpu_schedules(mod, target):
    """Schedule every not-yet-scheduled PrimFunc of `mod` for an llvm `target`."""
    from tvm.s_tir import dlight as dl

    with target:
        return dl.ApplyDefaultSchedule(*cpu_rules())(mod)
