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
    from tvm import s_tir, tirx  # optional (hetero[tvm]): loaded on first use
    from tvm.s_tir import dlight as dl  # optional (hetero[tvm]): loaded on first use

    # optional (hetero[tvm]): loaded on first use
    from tvm.s_tir.dlight.analysis import normalize_prim_func

    # optional (hetero[tvm]): loaded on first use
    from tvm.s_tir.dlight.base import ScheduleRule, get_extent, try_inline

    # optional (hetero[tvm]): loaded on first use
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

    def vector_rows(func, target):
        """Row-wise kernels (LayerNorm, softmax) with vectorized reductions.

        dlight's CPU Reduction rule leaves each row's sum a serial chain of dependent adds
        (one every ~4 cycles): a 1024x256 LayerNorm took 0.95 ms against torch's 0.24. Here
        each reduction is first split into `lanes` partial sums (rfactor, done while every
        block still has its own loop nest: rfactor needs that), which vectorize; then all
        blocks move under the parallel row loop as in dlight's rule.
        """
        sch = s_tir.Schedule(func)
        infos = normalize_prim_func(sch)
        if infos is None or len(infos) < 2 or not infos[-1].is_injective():
            return None
        if all(i.is_injective() for i in infos):
            return None
        kinds = [i.dom_kind() for i in infos]
        lead = min(len(k) - len(k.lstrip("S")) for k in kinds)
        if lead == 0:
            return None
        vec = lanes(target, sch, infos[-1].block_rv)
        order, partials = [], []
        for info in infos:
            kind = info.dom_kind()
            if info.is_injective():
                order.append(info.block_rv)
                continue
            loops = sch.get_loops(info.block_rv)
            extent = get_extent(sch, loops[-1])
            if kind.count("R") != 1 or not kind.endswith("R") or not isinstance(extent, int):
                return None
            if extent % vec or extent < 2 * vec:
                order.append(info.block_rv)  # short or ragged rows: keep the serial sum
                continue
            _, inner = sch.split(loops[-1], factors=[None, vec])
            ndim = len(sch.get(info.block_rv).writes[0].source.shape)
            rf = sch.rfactor(inner, factor_axis=ndim)
            order += [rf, info.block_rv]
            partials.append(rf)
        if not partials:
            return None
        last = order[-1]
        loops = sch.get_loops(last)
        spatial = sch.fuse(*loops[:lead]) if lead > 1 else loops[0]
        sch.parallel(spatial)
        for block in reversed(order[:-1]):
            sch.compute_at(block, spatial, preserve_unit_loops=True)
        for block in order:
            if any(block.same_as(p) for p in partials):
                # compute_at lays loops out in block-var order, lanes first: put the
                # reduction outside the lanes, then vectorize the lanes.
                loops = sch.get_loops(block)
                lane, red = loops[1], loops[-1]
                sch.reorder(red, lane)
                sch.vectorize(sch.get_loops(block)[-1])
            elif (
                sch.get(block).init is None
                and len(sch.get_loops(block)) > 1
                and str(sch.get(block).writes[0].source.dtype) != "bool"
            ):
                # injective, with a loop of its own under the row loop: vectorize it. Not
                # where it writes booleans (a causal mask fused into an attention matmul):
                # LLVM's codegen met a select of a loaded bool (stored as int8) and a bool
                # constant as int8x16 against boolx16, and the partition did not build.
                inner = sch.get_loops(block)[-1]
                extent = get_extent(sch, inner)
                if isinstance(extent, int) and extent > vec and extent % vec == 0:
                    _, v = sch.split(inner, factors=[None, vec])
                    sch.vectorize(v)
                elif isinstance(extent, int) and 2 <= extent <= vec:
                    sch.vectorize(inner)
        return sch

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

    return [Safe(injective), Safe(vector_rows), Safe(rows), Safe(parallel_outer)]


def apply_cpu_schedules(mod, target):
    """Schedule every not-yet-scheduled PrimFunc of `mod` for an llvm `target`."""
    from tvm.s_tir import dlight as dl  # optional (hetero[tvm]): loaded on first use

    with target:
        return dl.ApplyDefaultSchedule(*cpu_rules())(mod)
