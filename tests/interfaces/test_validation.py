"""The input contract every way in checks: values, not only shapes (token ids, bool bytes,
NaN/Inf, dim ranges), with messages that name the input, the element and the bound."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import hetero
from hetero.errors import InvalidInput
from hetero.interfaces.models import TinyGPT
from hetero.interfaces.validation import Contract
from hetero.partitioner.graph import TensorMeta, capture

VOCAB, CTX = 64, 16
HOSTILE_IDS = [VOCAB, 1000, -1, 2**24, 2**31 - 1, -(2**31), 2**31, 2**32, 2**32 + 3, 2**62]


@pytest.fixture(scope="module")
def gpt():
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, dim=32, heads=2, layers=1, ctx=CTX).eval()
    idx = torch.randint(0, VOCAB, (1, 8))
    seq = torch.export.Dim("seq", min=2)  # no max: the position table bounds it
    graph = capture(model, (idx,), {"idx": {1: seq}})
    return model, idx, graph


def _refused(contract: Contract, inputs) -> str:
    with pytest.raises(InvalidInput) as info:
        contract.check(inputs)
    return str(info.value)


@pytest.mark.parametrize("bad", HOSTILE_IDS)
def test_token_ids_out_of_range_name_input_element_and_bound(gpt, bad):
    _, idx, graph = gpt
    x = idx.clone()
    x[0, 5] = bad
    msg = _refused(Contract.from_graph(graph), {"idx": x})
    assert "'idx'" in msg and "element [0, 5]" in msg and f"is {bad}" in msg
    assert "[0, 64)" in msg and "embedding" in msg and "module tok" in msg


def test_dim_ranges_come_from_export_and_from_tables(gpt):
    _, _, graph = gpt
    contract = Contract.from_graph(graph)
    contract.check({"idx": torch.zeros(1, CTX, dtype=torch.int64)})  # the longest allowed
    msg = _refused(contract, {"idx": torch.zeros(1, CTX + 1, dtype=torch.int64)})
    assert "dim 1" in msg and f"is {CTX + 1}" in msg and "2..16" in msg and "module pos" in msg
    assert "2..16" in _refused(contract, {"idx": torch.zeros(1, 1, dtype=torch.int64)})


def test_structure_errors(gpt):
    _, idx, graph = gpt
    contract = Contract.from_graph(graph)
    assert "missing input 'idx'" in _refused(contract, {})
    assert "unknown input 'z'" in _refused(contract, {"idx": idx, "z": idx})
    assert "dtype int32" in _refused(contract, {"idx": idx.int()})
    assert "3 dims" in _refused(contract, {"idx": idx[None]})
    assert "is a list" in _refused(contract, {"idx": idx.tolist()})


META = TensorMeta(("s0", 4), (2, 4), "float32")


def test_bool_bytes_other_than_0_or_1_are_refused():
    contract = Contract.from_metas({"m": TensorMeta((4,), (4,), "bool")})
    contract.check({"m": torch.tensor([True, False, True, True])})
    raw = torch.tensor([1, 0, 7, 1], dtype=torch.uint8).view(torch.bool)
    msg = _refused(contract, {"m": raw})
    assert "element [2]" in msg and "byte 7" in msg


def test_nonfinite_floats_are_refused_only_when_the_contract_says_finite():
    x = torch.ones(2, 4)
    x[1, 2] = float("nan")
    Contract.from_metas({"x": META}).check({"x": x})  # the Python API's default: eager's way
    msg = _refused(Contract.from_metas({"x": META}, finite=True), {"x": x})
    assert "'x'" in msg and "element [1, 2]" in msg and "nan" in msg
    x[1, 2] = float("-inf")
    assert "-inf" in _refused(Contract.from_metas({"x": META}, finite=True), {"x": x})
    for dtype in (torch.float16, torch.bfloat16):
        meta = TensorMeta((2,), (2,), str(dtype).removeprefix("torch."))
        bad = torch.tensor([1.0, float("inf")], dtype=dtype)
        assert "inf" in _refused(Contract.from_metas({"h": meta}, finite=True), {"h": bad})


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=16))
def test_a_request_passes_exactly_when_every_id_is_in_the_table(gpt, ids):
    _, _, graph = gpt
    contract = Contract.from_graph(graph)
    x = torch.tensor([ids], dtype=torch.int64)
    inside = all(0 <= i < VOCAB for i in ids)
    if inside:
        contract.check({"idx": x})
    else:
        first = next(k for k, i in enumerate(ids) if not 0 <= i < VOCAB)
        assert f"element [0, {first}]" in _refused(contract, {"idx": x})


def test_python_api_refuses_before_anything_runs(gpt, tmp_path):
    model, idx, _ = gpt
    cm = hetero.compile(model, (idx,), backends={"cpu": "eager"}, cache_dir=tmp_path)
    calls = []
    run = cm.executor.run
    cm.executor.run = lambda inputs: calls.append(1) or run(inputs)
    for bad in HOSTILE_IDS:
        x = idx.clone()
        x[0, 0] = bad
        with pytest.raises(InvalidInput, match=r"'idx'.*element \[0, 0\].*\[0, 64\)"):
            cm(x)
        with pytest.raises(InvalidInput, match=r"'idx'"):
            cm.run_flat({"idx": x})
    with pytest.raises(InvalidInput, match="captured with 1 input"):
        cm(idx, idx)
    assert not calls  # nothing reached the executor
    with torch.no_grad():
        torch.testing.assert_close(cm(idx), model(idx))
    cm.shutdown()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=2, max_size=16))
def test_the_gpus_queued_check_agrees_with_the_hosts_and_runs_on_ids_that_cannot_fault(gpt, ids):
    """`Contract.admit` checks a GPU input's ids with kernels (here run on the host: the same
    ops): the flag passes exactly when `check` would, and until it is read the request runs
    on the ids clamped into the table, each in-range id as it was."""
    from hetero.interfaces.validation import _on_device_check

    _, _, graph = gpt
    rule = Contract.from_graph(graph).inputs[0]
    x = torch.tensor([ids], dtype=torch.int64)
    ok, safe = _on_device_check(rule, x)
    assert bool(ok) == all(0 <= i < VOCAB for i in ids)
    assert bool(((safe >= 0) & (safe < VOCAB)).all())
    inside = (x >= 0) & (x < VOCAB)
    assert torch.equal(safe[inside], x[inside])


def test_only_checks_that_need_no_host_value_are_queued():
    """A bool's bytes and an index input's range are queued on the GPU; a float input's
    finiteness, and any input without a bound, are checked at once as before."""
    from hetero.interfaces.validation import InputRule, _on_device_check

    flags = InputRule("m", TensorMeta((4,), (4,), "bool"))
    raw = torch.tensor([1, 0, 7, 1], dtype=torch.uint8).view(torch.bool)
    ok, safe = _on_device_check(flags, raw)
    assert not bool(ok) and safe is raw
    assert bool(_on_device_check(flags, torch.tensor([True, False, True, False]))[0])
    assert _on_device_check(InputRule("x", META), torch.ones(2, 4)) is None
    ints = InputRule("n", TensorMeta((2,), (2,), "int64"))
    assert _on_device_check(ints, torch.tensor([5, -3])) is None
