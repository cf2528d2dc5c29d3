"""MeasuredChoice: equivalent programs timed on a real call's inputs when asked, the
fastest kept; until then the first serves."""

import time

import pytest

from hetero.runtime.measured_choice import MeasuredChoice


def _program(name: str, delay_s: float, calls: list[str]):
    def run(x):
        calls.append(name)
        time.sleep(delay_s)
        return x + 1

    return run


def test_the_first_program_serves_until_settle_keeps_the_fastest():
    calls: list[str] = []
    choice = MeasuredChoice(
        [("slow", _program("slow", 0.004, calls)), ("fast", _program("fast", 0.0, calls))],
        name="p0", warmup=1, trials=3,
    )  # fmt: skip
    assert [choice(k) for k in range(5)] == [1, 2, 3, 4, 5]
    assert calls == ["slow"] * 5 and choice.chosen is None  # never compiles mid-serving
    calls.clear()
    choice.settle()  # on the last call's inputs: 1 warm-up and 3 timed calls each
    assert calls.count("slow") == calls.count("fast") == 4
    assert choice.chosen[0] == "fast"
    assert choice.medians_ms["slow"] > choice.medians_ms["fast"]
    made = choice.made()  # what explain() shows: the kept program and every one's median
    assert made.stage == "p0" and made.chosen == "fast" and set(made.median_ms) == {"slow", "fast"}
    assert made.note().startswith("p0: fast chosen (fast ")
    calls.clear()
    assert choice(7) == 8 and calls == ["fast"]
    choice.settle()  # decided: nothing more runs
    assert calls == ["fast"]


def test_settle_before_any_call_decides_nothing():
    calls: list[str] = []
    choice = MeasuredChoice(
        [("a", _program("a", 0.0, calls)), ("b", _program("b", 0.0, calls))], name="p1"
    )
    choice.settle()
    assert choice.chosen is None and calls == [] and choice.made() is None


def test_one_candidate_is_chosen_at_once():
    calls: list[str] = []
    choice = MeasuredChoice([("only", _program("only", 0.0, calls))], name="p2")
    assert choice(1) == 2 and choice.chosen[0] == "only" and choice.times == {"only": []}
    assert choice.made() is None  # nothing was measured: no choice to report


def test_no_candidate_is_an_error_naming_the_stage():
    with pytest.raises(ValueError, match="decode:p3"):
        MeasuredChoice([], name="decode:p3")


def test_a_settle_that_skips_candidates_chooses_among_the_rest_or_leaves_the_choice_open():
    calls: list[str] = []

    def three():
        return MeasuredChoice(
            [("a", _program("a", 0.003, calls)), ("compiles", _program("compiles", 0.0, calls)),
             ("b", _program("b", 0.0, calls))],
            name="p5", warmup=1, trials=2,
        )  # fmt: skip

    choice = three()
    choice(1)
    choice.settle(skip=("compiles",))
    assert choice.chosen[0] == "b" and "compiles" not in calls  # never ran, and dropped
    assert [n for n, _ in choice.candidates] == ["b"]
    two = MeasuredChoice(
        [("a", _program("a", 0.0, calls)), ("compiles", _program("compiles", 0.0, calls))],
        name="p6",
    )
    two(1)
    two.settle(skip=("compiles",))  # one left to try: nothing decided, both kept
    assert two.chosen is None and len(two.candidates) == 2
    two.settle()
    assert two.chosen is not None


def test_a_fast_candidate_whose_outputs_differ_is_left_out_and_said(caplog):
    """A kernel wrong on this host (a vector path no test machine ran) must lose the choice,
    not win it by being fast: each candidate's first call on the settle's inputs is checked
    against the program that served until then."""
    import torch

    def right(x):
        time.sleep(0.003)
        return (x * 2, x.sum())

    def close(x):  # another summation order: agrees
        return (x * 2 * (1 + 1e-4), x.sum())

    def wrong(x):
        return (x * 3, x.sum())

    choice = MeasuredChoice(
        [("served", right), ("wrong", wrong), ("close", close)], name="decode:p4", trials=2
    )
    x = torch.randn(64, dtype=torch.float16)
    choice(x)
    with caplog.at_level("WARNING", logger="hetero.runtime"):
        choice.settle()
    assert choice.chosen[0] == "close"  # the fastest of those that agree
    assert set(choice.medians_ms) == {"served", "close"}  # "wrong" never timed
    assert "decode:p4: wrong left out: its outputs differ from served's" in caplog.text
    assert "relative error" in caplog.text


@pytest.mark.parametrize(
    "bad",
    ["nan", "shape", "dtype", "count", "int"],
)
def test_outputs_that_are_not_the_same_kind_of_value_disagree(bad):
    import torch

    from hetero.runtime.measured_choice import _disagreement

    ref = [torch.ones(4), 3]
    outs = {
        "nan": [torch.tensor([1.0, float("nan"), 1.0, 1.0]), 3],
        "shape": [torch.ones(5), 3],
        "dtype": [torch.ones(4, dtype=torch.float64), 3],
        "count": [torch.ones(4)],
        "int": [torch.ones(4), 4],
    }[bad]
    assert _disagreement(outs, ref) is not None
    assert _disagreement([torch.ones(4), 3], ref) is None
    assert _disagreement([torch.zeros(3)], [torch.zeros(3)]) is None  # zero against zero
