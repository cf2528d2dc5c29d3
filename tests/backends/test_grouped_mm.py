"""hetero::grouped_mm: every expert's run of rows times its weight in one kernel (run in
Triton's interpreter here), equal to transformers' host loop; and the rewrite that puts it in
place of that loop in a partition (backends/substitutes.py)."""

from __future__ import annotations

import importlib
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # the kernel runs in Triton's interpreter

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero.backends.grouped_mm import launch, looped
from hetero.backends.substitutes import substituted


@settings(max_examples=12, deadline=None)
@given(
    runs=st.lists(st.integers(0, 40), min_size=1, max_size=6),
    tail=st.integers(0, 9),
    depth=st.integers(1, 40),
    cols=st.integers(1, 70),
    half=st.booleans(),
)
def test_the_kernel_equals_the_loop_for_any_runs_of_rows(runs, tail, depth, cols, half):
    """Empty experts, runs shorter and longer than a row tile, rows past the last run (left
    zeros), odd depths and widths; float32 exactly, float16 to its rounding."""
    g = torch.Generator().manual_seed(sum(runs) * 31 + depth)
    dtype = torch.float16 if half else torch.float32
    offs = torch.tensor(runs).cumsum(0)
    x = torch.randn(int(offs[-1]) + tail, depth, generator=g).to(dtype)
    w = torch.randn(len(runs), depth, cols, generator=g).to(dtype)
    got = launch(x, w, offs)
    want = looped(x.double(), w.double(), offs)
    assert got.dtype == dtype and got.shape == want.shape
    if tail:
        assert not got[int(offs[-1]) :].any()
    tol = dict(rtol=2e-3, atol=2e-3 * depth**0.5) if half else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.double(), want, **tol)


def test_a_transposed_weight_is_read_by_its_strides():
    x = torch.randn(10, 16)
    w = torch.randn(3, 8, 16).transpose(1, 2)  # [E, K, N] seen through strides
    offs = torch.tensor([4, 4, 9])
    torch.testing.assert_close(launch(x, w, offs), looped(x, w, offs))


def test_the_operator_runs_the_loop_on_a_cpu_and_has_its_shape_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    x, w, offs = torch.randn(6, 4), torch.randn(2, 4, 5), torch.tensor([2, 6])
    torch.testing.assert_close(torch.ops.hetero.grouped_mm(x, w, offs), looped(x, w, offs))
    with FakeTensorMode() as mode:
        fx, fw, fo = (mode.from_tensor(t) for t in (x, w, offs))
        assert torch.ops.hetero.grouped_mm(fx, fw, fo).shape == (6, 5)


def test_mixed_dtypes_are_refused_as_the_loop_refuses_them():
    x, w, offs = torch.randn(4, 3), torch.randn(2, 3, 5, dtype=torch.float64), torch.tensor([1, 4])
    with pytest.raises(RuntimeError):
        torch.ops.hetero.grouped_mm(x, w, offs)


def _calling(op) -> torch.fx.GraphModule:
    g = torch.fx.Graph()
    x, w, offs = g.placeholder("x"), g.placeholder("w"), g.placeholder("offs")
    g.output((g.call_function(op, (x,), {"weight": w, "offs": offs}),))
    return torch.fx.GraphModule(torch.nn.Module(), g)


def test_a_partition_calling_transformers_loop_calls_heteros_kernel_instead():
    pytest.importorskip("transformers")
    importlib.import_module("transformers.integrations.moe")  # registers its operator
    theirs = torch.ops.transformers.grouped_mm_fallback.default
    gm = _calling(theirs)
    ours = substituted(gm)
    targets = [n.target for n in ours.graph.nodes if n.op == "call_function"]
    assert targets == [torch.ops.hetero.grouped_mm.default]
    # the partition's own module is left as it was: the eager reference still runs theirs
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [theirs]
    x, w, offs = torch.randn(7, 4), torch.randn(3, 4, 5), torch.tensor([2, 2, 7])
    torch.testing.assert_close(ours(x, w, offs)[0], gm(x, w, offs)[0])


def test_a_partition_without_library_operators_is_the_same_module():
    gm = _calling(torch.ops.aten.mm.default)
    assert substituted(gm) is gm


def test_bounds_past_the_rows_touch_no_memory_outside_them():
    """Runs' ends past x's rows (a malformed router's): the rows x has are computed, the
    output keeps x's size, and nothing past it is read or written."""
    x, w = torch.randn(5, 8), torch.randn(2, 8, 3)
    offs = torch.tensor([3, 40])
    got = launch(x, w, offs)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, looped(x, w, torch.tensor([3, 5])))
