"""FLOP counts the cost model prices with (partitioner/opinfo.py)."""

from __future__ import annotations

import pytest
import torch
from torch.utils import flop_counter

from hetero.partitioner.opinfo import count_flops

SDPA = (
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten.scaled_dot_product_attention.default,
)


@pytest.mark.parametrize("registry", [True, False], ids=["torch-formula", "own-formula"])
@pytest.mark.parametrize("target", SDPA, ids=lambda t: str(t).split(".")[-2])
@pytest.mark.parametrize("kv_heads", [32, 8, 1], ids=["mha", "gqa", "mqa"])
def test_attention_flops_count_every_query_head(target, kv_heads, registry, monkeypatch):
    """Grouped-query attention (fewer key/value heads than query heads) costs what each
    query head does: torch 2.11's sdpa formula raised on these shapes (the GPU machine),
    and a torch without a formula for the op leaves hetero's own."""
    if not registry:
        monkeypatch.setattr(flop_counter, "flop_registry", {})
    b, heads, sq, sk, d = 2, 32, 16, 40, 64
    q = torch.empty(b, heads, sq, d, device="meta")
    k = torch.empty(b, kv_heads, sk, d, device="meta")
    v = torch.empty(b, kv_heads, sk, d, device="meta")
    out = torch.empty(b, heads, sq, d, device="meta")
    assert count_flops(target, (q, k, v), out, [], []) == 2 * b * heads * sq * sk * (d + d)
