"""A partition's program retyped to compute its 16-bit work in another dtype (a float16
model's CPU layers in bfloat16): the same ops in that dtype, the model's dtype at its edges."""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp

from hetero.runtime.retype import host_tensor, retype_program


def block(x: torch.Tensor, w: torch.Tensor, cache: torch.Tensor, dtype=torch.float16):
    """An RMSNorm computed in float32 and cast back, a matmul, a KV-cache-like in-place
    write, a factory op naming the dtype, and an input passed straight through."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    h = h.to(dtype) @ w.t()
    cache[: h.shape[0]].copy_(h)
    return h + torch.ones(h.shape[-1], dtype=dtype), x


def _traced(x, w, cache):
    return block(x, w, cache)


def _inputs():
    torch.manual_seed(0)
    x = torch.randn(2, 16, dtype=torch.float16)
    w = (torch.randn(16, 16) / 4).to(torch.float16)
    return x, w, torch.zeros(4, 16, dtype=torch.float16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_a_retyped_program_computes_the_same_ops_in_the_new_dtype(dtype):
    x, w, cache = _inputs()
    gm = make_fx(_traced)(x, w, cache.clone())
    retyped = retype_program(gm, (x,), dtype)
    w_host, cache_host = host_tensor(w, dtype), host_tensor(cache, dtype)
    out, passed = retyped(x, w_host, cache_host)

    # the edges keep the model's dtype; the state is updated in place in the new one
    assert out.dtype == passed.dtype == torch.float16 and cache_host.dtype == dtype
    assert torch.equal(passed, x)
    # exactly the function computed in `dtype` (the same ops, not float16 ones converted)
    want_cache = torch.zeros(4, 16, dtype=dtype)
    want, _ = block(x.to(dtype), w.to(dtype), want_cache, dtype=dtype)
    assert torch.equal(out, want.to(torch.float16))
    assert torch.equal(cache_host, want_cache) and cache_host[:2].abs().sum() > 0
    # and the original module is untouched: it still computes in float16
    ref_out, _ = gm(x, w, cache.clone())
    fp16, _ = block(x, w, cache.clone())
    assert torch.equal(ref_out, fp16)


def test_no_value_inside_a_retyped_program_is_float16():
    x, w, cache = _inputs()
    retyped = retype_program(make_fx(_traced)(x, w, cache.clone()), (x,), torch.bfloat16)
    ShapeProp(retyped).propagate(
        x, host_tensor(w, torch.bfloat16), host_tensor(cache, torch.bfloat16)
    )
    inside = [
        n
        for n in retyped.graph.nodes
        if n.op == "call_function" and not any(u.op == "output" for u in n.users)
    ]
    dtypes = {n.meta["tensor_meta"].dtype for n in inside if "tensor_meta" in n.meta}
    assert torch.float16 not in dtypes and torch.bfloat16 in dtypes


def test_host_tensor_retypes_only_16_bit_floats():
    assert host_tensor(torch.ones(2, dtype=torch.float16), torch.bfloat16).dtype == torch.bfloat16
    assert host_tensor(torch.ones(2), torch.bfloat16).dtype == torch.float32
    assert host_tensor(torch.ones(2, dtype=torch.long), torch.bfloat16).dtype == torch.long
    t = torch.ones(2, dtype=torch.float16)
    assert host_tensor(t, None) is t
