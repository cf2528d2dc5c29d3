"""A host CPU's 16-bit Linears through oneDNN on weights packed once (a candidate of the CPU
decode program's measured choice). Skipped where oneDNN has no 16-bit kernel."""

from __future__ import annotations

import pytest
import torch
from torch import fx

from hetero.backends.packed_linear import PackedLinear, pack_linears, packable_dtypes

_aten = torch.ops.aten
DTYPES = packable_dtypes()


def _layer(x, w1, b1, w2):  # weights as inputs, as a generation's shared layer program takes them
    return _aten.linear.default(torch.relu(_aten.linear.default(x, w1, b1)), w2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_routed_linears_compute_what_linear_does_and_pack_each_weight_once(dtype):
    if dtype not in DTYPES:
        pytest.skip(f"oneDNN has no {dtype} kernel on this CPU")
    gm = fx.symbolic_trace(_layer)
    assert pack_linears(gm, DTYPES) == 2
    targets = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_module")]
    assert targets.count("packed_linear") == 2 and _aten.linear.default not in targets
    torch.manual_seed(0)
    x = torch.randn(1, 1, 64).to(dtype)
    layers = [
        (torch.randn(96, 64).to(dtype), torch.randn(96).to(dtype), torch.randn(32, 96).to(dtype))
        for _ in range(2)
    ]
    for _ in range(2):  # each layer's weights twice: packed on the first call only
        for w1, b1, w2 in layers:
            want = _layer(x, w1, b1, w2)  # the op-by-op program's kernels, same dtype
            got = gm(x, w1, b1, w2)
            assert got.dtype == dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=2e-2, atol=5e-2)
    assert len(gm.packed_linear.packed) == 4
    # a weight written in place is packed again, not served stale
    w1, b1, w2 = layers[0]
    w1.mul_(2)
    torch.testing.assert_close(gm(x, w1, b1, w2), _layer(x, w1, b1, w2), rtol=2e-2, atol=5e-2)


def test_other_dtypes_take_linear_unchanged():
    lin = PackedLinear(DTYPES)
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    assert torch.equal(lin(x, w), torch.nn.functional.linear(x, w))
    assert not lin.packed


def test_nothing_is_routed_where_onednn_has_no_16_bit_kernel():
    gm = fx.symbolic_trace(_layer)
    assert pack_linears(gm, ()) == 0 and not hasattr(gm, "packed_linear")


def test_weights_traced_in_another_dtype_are_left_to_linear():
    gm = fx.symbolic_trace(_layer)
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            n.meta["val"] = torch.empty(0)  # float32, as an export records it
    assert pack_linears(gm, (torch.bfloat16,)) == 0
