"""The TVM CPU lowering's rewrites: Linear chains to oneDNN, fast transcendental functions,
dynamic dims — each checked for what it emits and against eager."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hetero.backends.base import CompileOptions
from hetero.backends.compile import CompileJob, compile_units
from hetero.backends.registry import default_registry
from hetero.backends.units import contiguous_cut, units_for
from hetero.interfaces.models import mlp_block, tiny_gpt
from hetero.partitioner.graph import capture
from hetero.runtime.build import dynamic_dims

pytest.importorskip("tvm")
pytestmark = pytest.mark.tvm


def _relax(unit):
    from tvm import relax

    from hetero.backends.tvm.frontend import to_relax

    mod, _ = to_relax(unit, None)
    mod = relax.transform.DecomposeOpsForInference()(mod)
    return relax.transform.FoldConstant()(mod)


def _calls(mod) -> list[str]:
    text = mod["main"].script()
    return [line.split('R.call_pure_packed("')[1].split('"')[0] for line in text.splitlines()
            if "R.call_pure_packed(" in line]  # fmt: skip


class Epilogues(torch.nn.Module):
    """One Linear per epilogue kind the offload recognises, plus one it must leave alone."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c, self.d = (torch.nn.Linear(32, 32) for _ in range(4))
        self.e = torch.nn.Linear(32, 32, bias=False)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.a(x))  # bias + GELU
        h = torch.nn.functional.gelu(self.b(h), approximate="tanh")  # bias + tanh-GELU
        h = torch.relu(self.c(h)) + h  # bias + ReLU, whose output is also used by the add
        h = self.d(h) + x  # bias + residual
        return self.e(h) * 2.0, h  # no bias, not an epilogue: stays a plain BLAS matmul


@pytest.fixture(scope="module")
def epilogues():
    torch.manual_seed(0)
    return Epilogues().eval(), (torch.randn(2, 16, 32),)


def test_linear_chains_become_one_onednn_call_each(epilogues):
    from hetero.backends.tvm.linear import PREFIX, offload_linears

    m, args = epilogues
    graph = capture(m, args)
    _, units, _ = units_for(graph, contiguous_cut(graph, 1), *args)
    calls = _calls(offload_linears(_relax(units[0])))
    # tanh-GELU stays a TVM kernel after a bias-only call (oneDNN's is slow: linear.py)
    assert calls == [f"{PREFIX}_gelu", PREFIX, f"{PREFIX}_relu", f"{PREFIX}_add"]


def _dps_calls(mod) -> list[tuple[str, str]]:
    """(function name, the weight argument's type) of each R.call_dps_packed in main."""
    from tvm import relax

    from hetero.backends.tvm.dispatch import KERNELS

    out = []

    def visit(e):
        fn = e.args[0] if isinstance(e, relax.Call) and e.args else None
        if isinstance(fn, relax.ExternFunc) and fn.global_symbol in KERNELS:
            out.append((fn.global_symbol, e.args[1].fields[1].ty))

    relax.analysis.post_order_visit(mod["main"], visit)
    return out


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_a_16_bit_constant_weight_goes_to_the_library_rows_first(dtype):
    """torch's 16-bit CPU product reads nn.Linear's [N, K] weight as a @ W.T far faster than
    the [K, N] constant FoldConstant makes (float16 30x on the dev box): a 16-bit constant
    weight is handed over rows first, float32's as folded."""
    from hetero.backends.tvm.dispatch import MATMUL, MATMUL_NT, dispatch_matmuls

    torch.manual_seed(0)
    m = torch.nn.Linear(64, 48, bias=False).to(dtype).eval()
    x = torch.randn(4, 64).to(dtype)
    graph = capture(m, (x,))
    _, units, _ = units_for(graph, contiguous_cut(graph, 1), x)
    ((name, ty),) = _dps_calls(dispatch_matmuls(_relax(units[0])))
    shape = [int(d) for d in ty.shape]
    if dtype == torch.float32:
        assert name == MATMUL and shape == [64, 48]
    else:
        assert name == MATMUL_NT and shape == [48, 64]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_linear_through_the_library_matches_eager(dtype, artifact_cache, cpu_device):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.GELU(), torch.nn.Linear(160, 96))
    m = m.to(dtype).eval()
    x = torch.randn(8, 96).to(dtype)
    graph = capture(m, (x,))
    _, units, _ = units_for(graph, contiguous_cut(graph, 1), x)
    (art,) = compile_units([CompileJob(units[0], cpu_device, "tvm", CompileOptions())],
                           artifact_cache, workers=1, progress=False)  # fmt: skip
    (got,) = default_registry().get("tvm").load(art, cpu_device)(x)
    with torch.no_grad():
        want = m(x)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
def test_offloaded_linears_match_eager(onednn, epilogues, artifact_cache, cpu_device):
    m, args = epilogues
    graph = capture(m, args)
    _, units, _ = units_for(graph, contiguous_cut(graph, 1), *args)
    opts = CompileOptions(extra=(("onednn", onednn), ("onednn_min_flops", 0)))
    (art,) = compile_units([CompileJob(units[0], cpu_device, "tvm", opts)], artifact_cache,
                           workers=1, progress=False)  # fmt: skip
    got = default_registry().get("tvm").load(art, cpu_device)(*units[0].example_inputs)
    with torch.no_grad():
        want = m(*args)
    for g, w in zip(got, want, strict=True):
        assert float((g - w).norm() / w.norm()) < 1e-5


def test_without_blas_a_causal_mask_fused_into_attention_builds(artifact_cache, cpu_device):
    """blas: False leaves the attention matmuls to TVM, where FuseOps puts the causal mask
    (booleans) in the matmul's kernel; the row rule vectorized the mask's blocks and LLVM's
    codegen refused the result (int8x16 against boolx16): the demo model did not build."""
    m, args = tiny_gpt(batch=2, seq=64)
    graph = capture(m, args)
    _, units, _ = units_for(graph, {n: 0 for n in graph.order}, *args)
    opts = CompileOptions(extra=(("blas", False),))
    (art,) = compile_units([CompileJob(units[0], cpu_device, "tvm", opts)], artifact_cache,
                           workers=1, progress=False)  # fmt: skip
    got = default_registry().get("tvm").load(art, cpu_device)(*args)
    with torch.no_grad():
        want = m(*args)
    torch.testing.assert_close(got[0], want if torch.is_tensor(want) else want[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip


def test_kernels_fall_back_without_onednn(monkeypatch):
    """A torch built without oneDNN still runs an offloaded artifact (F.linear + epilogue)."""
    import tvm

    from hetero.backends.tvm import linear

    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    table = {}
    linear.register(lambda name, fn: table.__setitem__(name, fn))
    assert set(table) == set(linear.kernel_names())
    x, w, b, r = torch.randn(4, 8), torch.randn(6, 8), torch.randn(6), torch.randn(4, 6)
    t = tvm.runtime.from_dlpack
    got = torch.from_dlpack(table[f"{linear.PREFIX}_gelu"](t(x), t(w), t(b)))
    torch.testing.assert_close(got, torch.nn.functional.gelu(x @ w.T + b))
    got = torch.from_dlpack(table[f"{linear.PREFIX}_add"](t(x), t(w), t(b), t(r)))
    torch.testing.assert_close(got, x @ w.T + b + r)


def test_fast_math_legalizes_transcendentals_without_libm_calls():
    """GELU/erf/tanh/exp become arithmetic TIR (vectorizable), not scalar libm calls."""
    import tvm
    from tvm import relax

    from hetero.backends.tvm.fastmath import legalize_map

    x = relax.Var("x", relax.TensorType([4, 64], "float32"))
    bb = relax.BlockBuilder()
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.gelu(x))
            y = bb.emit(relax.op.tanh(y))
            y = bb.emit_output(relax.op.nn.softmax(y))
        bb.emit_func_output(y)
    fast = relax.transform.LegalizeOps(legalize_map())(bb.get())
    exact = relax.transform.LegalizeOps()(bb.get())
    text = lambda mod: "\n".join(  # noqa: E731
        f.script() for f in mod.functions.values() if isinstance(f, tvm.tirx.PrimFunc)
    )
    assert "T.erf(" in text(exact) and "T.tanh(" in text(exact)
    assert "T.erf(" not in text(fast) and "T.tanh(" not in text(fast)
    assert "T.exp(" not in text(fast)


@pytest.mark.parametrize("model", ["mlp", "demo"])
def test_dynamic_dims_compile_once_and_run_at_other_sizes(model, artifact_cache, cpu_device):
    """A partition captured with a symbolic dim compiles once and serves other sizes."""
    if model == "mlp":
        m, args = mlp_block(batch=2, seq=8)
        shapes = {"x": {0: torch.export.Dim("batch", min=1, max=16)}}
        other = (torch.randn(5, 8, args[0].shape[-1]),)
    else:
        m, args = tiny_gpt(batch=1, seq=16)
        shapes = {"idx": {1: torch.export.Dim("seq", min=2, max=32)}}
        other = (torch.randint(0, 100, (1, 24)),)
    graph = capture(m, args, shapes)
    parts, units, _ = units_for(graph, contiguous_cut(graph, 1), *args)
    unit = dataclasses.replace(units[0], dynamic_dims=dynamic_dims(graph, parts[0].inputs))
    assert unit.dynamic_dims
    (art,) = compile_units([CompileJob(unit, cpu_device, "tvm")], artifact_cache, workers=1,
                           progress=False)  # fmt: skip
    run = default_registry().get("tvm").load(art, cpu_device)
    with torch.no_grad():
        for inputs in (args, other):
            (got,) = run(*inputs)
            want = m(*inputs)
            assert got.shape == want.shape
            assert float((got - want).norm() / want.norm()) < 1e-4


def test_sizes_crossing_a_cut_are_carried_as_tensor_dims(artifact_cache, cpu_device):
    """A cut that hands `batch*128` and `batch` over as ints: the second partition takes
    them as (n, 0) size carriers, and the chain serves other batch sizes."""
    m, args = mlp_block(batch=2, seq=8)
    graph = capture(m, args, {"x": {0: torch.export.Dim("batch", min=1, max=16)}})
    parts, units, _ = units_for(graph, contiguous_cut(graph, 2), *args)
    units = [
        dataclasses.replace(u, dynamic_dims=dynamic_dims(graph, p.inputs))
        for p, u in zip(parts, units, strict=True)
    ]
    assert any(d < 0 for u in units for _, d, _ in u.dynamic_dims), "no size crosses this cut"
    arts = compile_units([CompileJob(u, cpu_device, "tvm") for u in units], artifact_cache,
                         workers=1, progress=False)  # fmt: skip
    runs = [default_registry().get("tvm").load(a, cpu_device) for a in arts]
    with torch.no_grad():
        for x in (args[0], torch.randn(5, 8, args[0].shape[-1])):
            vals = {next(iter(graph.inputs)): x}
            for unit, run in zip(units, runs, strict=True):
                vals.update(zip(unit.outputs, run(*[vals[a] for a in unit.inputs]), strict=True))
            got, want = vals[units[-1].outputs[0]], m(x)
            assert got.shape == want.shape
            assert float((got - want).norm() / want.norm()) < 1e-4


def test_hetero_compile_with_dynamic_dims_serves_other_lengths(tmp_path):
    """The demo's CPU + emulated-NPU pipeline captured with a dynamic sequence length:
    compiled once through TVM, it answers prompts of other lengths like eager."""
    import hetero
    from hetero.cluster.spec import ClusterSpec

    m, args = tiny_gpt(batch=1, seq=32)
    root = __import__("pathlib").Path(__file__).resolve().parents[2]
    cluster = ClusterSpec.from_yaml(root / "configs/clusters/dev-box-npu.yaml")
    seq = torch.export.Dim("seq", min=2, max=64)
    with hetero.compile(m, args, cluster, "throughput", {"idx": {1: seq}},
                        {"cpu": "tvm", "npu": "tvm"}, tmp_path, "local") as cm:  # fmt: skip
        assert len(cm.plan.partitions) >= 2
        with torch.no_grad():
            for n in (32, 9, 57):
                x = torch.randint(0, 512, (1, n))
                got, want = cm(x), m(x)
                got = got[0] if isinstance(got, tuple | list) else got
                assert got.shape == want.shape
                assert float((got - want).norm() / want.norm()) < 1e-4


def test_a_partition_already_in_core_aten_is_not_decomposed_again(monkeypatch):
    """A partition's re-export holds the captured graph's ops, decomposed at capture: the
    frontend imports it without tracing it through the decompositions again. A program
    with an op the table decomposes (a Linear exported as is) or an in-place op is."""
    from torch.export import ExportedProgram

    from hetero.backends.export import export_unit
    from hetero.backends.tvm.frontend import _decomposed, to_relax
    from hetero.partitioner.graph import decomposition_table

    table = decomposition_table()
    model, (x,) = mlp_block(batch=2, seq=8)
    graph = capture(model, (x,))
    _, (unit,), _ = units_for(graph, dict.fromkeys(graph.nodes, 0), x)
    assert _decomposed(export_unit(unit, carry_sizes=True), table)
    calls = []
    real = ExportedProgram.run_decompositions
    monkeypatch.setattr(
        ExportedProgram,
        "run_decompositions",
        lambda ep, *a, **k: calls.append(1) or real(ep, *a, **k),
    )
    to_relax(unit)
    assert calls == []

    class InPlace(torch.nn.Module):
        def forward(self, a):
            return torch.nn.functional.linear(a, torch.ones(4, 4)).add_(1.0)

    raw = torch.export.export(InPlace(), (torch.randn(2, 4),), strict=False)
    assert not _decomposed(raw, table)
