"""tile_model's ranking of matmul configs, and autotune's use of it (no GPU needed)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero.backends.triton.autotune import CANDIDATES, MATMUL_KEEP, candidates
from hetero.backends.triton.codegen import Kernel
from hetero.backends.triton.tile_model import Gemm, Gpu, estimate, ranked, resident

H100 = Gpu(sms=132, shared_bytes=228 << 10, threads=2048)


def cfg(bm, bn, bk, warps=4, stages=3):
    return {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps,
            "num_stages": stages, "GROUP_M": 8}  # fmt: skip


def test_a_config_over_the_shared_memory_does_not_fit():
    big = cfg(256, 256, 128, warps=8, stages=4)  # 4 x (256x128 + 128x256) x 2 B = 512 KiB
    assert resident(big, Gemm(1, 4096, 4096, 4096), H100) == 0
    assert estimate(big, Gemm(1, 4096, 4096, 4096), H100) == math.inf
    assert big not in ranked((big, cfg(128, 128, 64)), Gemm(1, 4096, 4096, 4096), H100)


def test_a_gated_kernel_needs_room_for_both_b_tiles():
    c = cfg(128, 128, 64, warps=8, stages=3)  # 96 KiB of tiles, 144 KiB gated
    assert resident(c, Gemm(1, 4096, 4096, 4096, operands=2), H100) < resident(
        c, Gemm(1, 4096, 4096, 4096), H100
    )


def test_a_last_wave_that_leaves_sms_idle_costs_a_whole_wave():
    # 132 SMs: 128x128 tiles of a 2048x8448 output are 16x66 = 1056 = 8 waves of one CTA
    # per SM exactly; one more column of tiles adds a ninth wave for 16 tiles
    c = cfg(128, 128, 64, warps=8, stages=4)
    per_sm = resident(c, Gemm(1, 2048, 8448, 1024), H100)
    full = estimate(c, Gemm(1, 2048, 8448, 1024), H100)
    over = estimate(c, Gemm(1, 2048, 8448 + 128, 1024), H100)
    assert over / full == pytest.approx(math.ceil(1072 / (132 * per_sm)) / (1056 / (132 * per_sm)))


def test_a_one_row_product_prefers_narrow_row_tiles():
    gemm = Gemm(1, 4, 4096, 4096)
    best = ranked(CANDIDATES["matmul"], gemm, H100)[0]
    assert best["BLOCK_M"] <= 32


@settings(max_examples=60, deadline=None)
@given(
    b=st.sampled_from([1, 8]),
    m=st.integers(1, 8192),
    n=st.integers(16, 16384),
    k=st.integers(16, 8192),
    gated=st.booleans(),
    trials=st.integers(0, 20),
)
def test_candidates_on_a_gpu_are_a_ranked_subset_within_the_budget(b, m, n, k, gated, trials):
    kind = "gated" if gated else "matmul"
    ops = 2 if gated else 1
    kernel = Kernel("k0", kind, "key", 1, flops=2 * b * m * n * k * ops,
                    bytes=2 * b * (m * k + ops * k * n + m * n), space=(b, m, n))  # fmt: skip
    everything = candidates(kernel)
    chosen = candidates(kernel, H100, trials)
    assert chosen and len(chosen) <= (trials or MATMUL_KEEP)
    assert all(c in everything for c in chosen)
    gemm = Gemm(b, m, n, k, ops)
    times = [estimate(c, gemm, H100) for c in chosen]
    assert times == sorted(times)
