"""hetero::gemv, the host CPU's 16-bit matrix-vector kernel: the same values as F.linear, the
cases it hands back to torch, and its routing into a program."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetero.backends import cpu_gemv
from hetero.backends.linear_fold import fold_linears

pytestmark = pytest.mark.skipif(
    not cpu_gemv.available(), reason="hetero::gemv cannot be built on this host"
)


def _err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    "rows,n,k",
    [(1, 515, 4096), (1, 37, 1001), (2, 8, 16), (3, 5, 7), (4, 130, 72)],  # tails of N and K
)
@pytest.mark.parametrize("bias", [False, True])
def test_the_kernel_computes_linear(dtype, rows, n, k, bias):
    torch.manual_seed(0)
    x = torch.randn(rows, k).to(dtype)
    w = torch.randn(n, k).to(dtype)
    b = torch.randn(n).to(dtype) if bias else None
    ref = F.linear(x.float(), w.float(), None if b is None else b.float())
    y = cpu_gemv.gemv(x, w, b)
    assert y.dtype == dtype and y.shape == (rows, n)
    # float32 accumulation, one rounding to 16 bits at the end: as close as torch's own
    assert _err(y, ref) <= 1.05 * _err(F.linear(x, w, b), ref) + 1e-6


def test_leading_dims_and_a_non_contiguous_input_keep_their_shape():
    x = torch.randn(8, 1, 64).half()[::2]  # [4, 1, 64], strided
    w = torch.randn(24, 64).half()
    y = cpu_gemv.gemv(x, w)
    assert y.shape == (4, 1, 24)
    torch.testing.assert_close(y, F.linear(x, w), rtol=2e-3, atol=2e-3)


def test_infinities_and_nan_propagate_as_torchs_do():
    x = torch.ones(1, 32).half()
    w = torch.ones(3, 32).half()
    w[1, 0] = float("inf")
    w[2, 5] = float("nan")
    y = cpu_gemv.gemv(x, w)
    assert y[0, 0] == 32 and torch.isinf(y[0, 1]) and torch.isnan(y[0, 2])
    yb = cpu_gemv.gemv(x.bfloat16(), w.bfloat16())
    assert yb[0, 0] == 32 and torch.isinf(yb[0, 1]) and torch.isnan(yb[0, 2])


@pytest.mark.parametrize(
    "case",
    ["float32", "many rows", "transposed weight", "mixed dtypes"],
)
def test_what_the_kernel_does_not_take_goes_to_torch(case):
    x, w = torch.randn(1, 64).half(), torch.randn(32, 64).half()
    if case == "float32":
        x, w = x.float(), w.float()
    elif case == "many rows":
        x = torch.randn(cpu_gemv.MAX_ROWS + 1, 64).half()
    elif case == "transposed weight":
        w = torch.randn(64, 32).half().t()
    else:
        x = x.float()
    assert not cpu_gemv.takes(x, w, None)
    if case == "mixed dtypes":
        with pytest.raises(RuntimeError):  # what F.linear itself says
            cpu_gemv.gemv(x, w)
        return
    torch.testing.assert_close(cpu_gemv.gemv(x, w), F.linear(x, w))


class _Layer(torch.nn.Module):
    """A decode layer's shape of program: its weights arrive as inputs (a generation binds
    each layer's weights per call)."""

    def forward(self, x, w_up, b_up, w_down):
        return F.linear(F.silu(F.linear(x, w_up, b_up)), w_down)


def _folded(dtype: torch.dtype):
    from hetero.backends.export import runnable

    args = (torch.randn(1, 1, 64), torch.randn(96, 64), torch.randn(96), torch.randn(64, 96))
    args = tuple(a.to(dtype) for a in args)
    gm = runnable(torch.export.export(_Layer(), args))
    fold_linears(gm)
    return gm, args


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_routing_sends_input_weights_through_the_kernel_with_the_same_values(dtype):
    gm, args = _folded(dtype)
    ref = gm(*args)
    assert cpu_gemv.route_gemv(gm) == 2
    assert sum(n.target is cpu_gemv.gemv for n in gm.graph.nodes) == 2
    torch.testing.assert_close(gm(*args), ref, rtol=4e-3, atol=4e-3)


def test_float32_programs_are_left_alone():
    gm, _ = _folded(torch.float32)
    assert cpu_gemv.route_gemv(gm) == 0
    assert not any(n.target is cpu_gemv.gemv for n in gm.graph.nodes)


def test_inductor_compiles_a_routed_program_around_the_kernel():
    gm, args = _folded(torch.float16)
    ref = gm(*args)
    cpu_gemv.route_gemv(gm)
    out = torch.compile(gm, dynamic=False, fullgraph=True)(*args)
    torch.testing.assert_close(out, ref, rtol=4e-3, atol=4e-3)
