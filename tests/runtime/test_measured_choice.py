"""MeasuredChoice: equivalent programs tried in turn on real calls, the fastest kept."""

import threading
import time

import pytest
import torch

from hetero.runtime.measured_choice import MeasuredChoice


def _program(name: str, delay_s: float, calls: list[str]):
    def run(x, *state):
        calls.append(name)
        time.sleep(delay_s)
        return x + 1

    return run


def test_the_faster_program_is_kept_after_its_trials():
    calls: list[str] = []
    choice = MeasuredChoice(
        [("slow", _program("slow", 0.004, calls)), ("fast", _program("fast", 0.0, calls))],
        name="p0", after=2, warmup=1, trials=3,
    )  # fmt: skip
    outs = [choice(k) for k in range(10)]  # 2 before the trials, 2 warm-up, 2 x 3 timed
    assert outs == [k + 1 for k in range(10)]  # every call served, whichever ran it
    assert calls[:2] == ["slow", "slow"] and choice.chosen is not None
    assert calls[2:].count("slow") == calls[2:].count("fast") == 4  # in turn until chosen
    assert choice.chosen[0] == "fast"
    assert choice.medians_ms["slow"] > choice.medians_ms["fast"]
    calls.clear()
    choice(0), choice(1)
    assert calls == ["fast", "fast"]


def test_one_candidate_is_chosen_at_once():
    calls: list[str] = []
    choice = MeasuredChoice([("only", _program("only", 0.0, calls))], name="p1")
    assert choice(1) == 2 and choice.chosen[0] == "only" and choice.times == {"only": []}


def test_no_candidate_is_an_error_naming_the_stage():
    with pytest.raises(ValueError, match="decode:p3"):
        MeasuredChoice([], name="decode:p3")


def test_a_program_called_fewer_times_than_after_never_runs_the_others():
    calls: list[str] = []
    choice = MeasuredChoice(
        [("op-by-op", _program("op-by-op", 0.0, calls)), ("compiled", _program("c", 0.0, calls))],
        name="p2", after=5,
    )  # fmt: skip
    for k in range(5):
        choice(k)
    assert calls == ["op-by-op"] * 5 and choice.chosen is None


class _Compiling:
    """A candidate that must prepare first (as a compile does), on a thread of its own."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.prepared_with: tuple = ()
        self.calls = 0

    def prepare(self, *args):
        self.prepared_with = args
        args[1].add_(100)  # writes its input as a step writes the cache
        self.release.wait(10)

    def __call__(self, x, cache):
        self.calls += 1
        return x + 1


def test_a_candidate_prepares_in_the_background_on_copies_of_what_it_writes():
    served: list[str] = []
    slow = _Compiling()
    choice = MeasuredChoice(
        [("op-by-op", _program("op-by-op", 0.0, served)), ("compiled", slow)],
        name="p4", mutated=[1], after=1, warmup=0, trials=2,
    )  # fmt: skip
    cache = torch.zeros(3)
    for k in range(4):  # preparing: the first candidate serves, nothing waits
        assert choice(torch.tensor(k), cache) == k + 1
    assert served == ["op-by-op"] * 4 and slow.calls == 0
    assert torch.equal(cache, torch.zeros(3))  # the prepare wrote a copy
    assert slow.prepared_with[1] is not cache
    slow.release.set()
    choice._preparing.join(5)
    for k in range(4):  # then in turn
        choice(torch.tensor(k), cache)
    assert slow.calls == 2 and choice.chosen is not None


def test_settle_decides_on_the_last_inputs_waiting_for_the_preparation():
    served: list[str] = []
    slow = _Compiling()
    slow.release.set()
    choice = MeasuredChoice(
        [("op-by-op", _program("op-by-op", 0.0, served)), ("compiled", slow)],
        name="p5", mutated=[1], after=32, trials=2,
    )  # fmt: skip
    choice.settle()  # never called: nothing to decide on
    assert choice.chosen is None
    choice(torch.tensor(1), torch.zeros(3))
    choice.settle()
    assert choice.chosen is not None and slow.calls == 3  # 1 warm-up, 2 timed
    assert set(choice.medians_ms) == {"op-by-op", "compiled"}
