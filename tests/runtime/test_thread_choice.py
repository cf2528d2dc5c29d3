"""The host CPU teams' width chosen by timing whole decode steps (runtime/thread_choice.py),
on a fake clock: each step 'takes' what the applied count costs."""

from __future__ import annotations

import types

import pytest

import hetero.runtime.measured_choice as measured_choice
from hetero.runtime.thread_choice import candidates, choose_threads


class _Host:
    """Applied counts and a clock that a step advances by the cost of the counts applied."""

    def __init__(self, monkeypatch, cost_ms: dict[int, float]) -> None:
        self.now = 0.0
        self.cost_ms = cost_ms
        self.applied: list[dict[str, int]] = []
        monkeypatch.setattr(
            measured_choice, "time", types.SimpleNamespace(perf_counter=lambda: self.now)
        )

    def apply(self, threads) -> None:
        self.applied.append(dict(threads))

    def step(self) -> None:
        (n,) = self.applied[-1].values()
        self.now += self.cost_ms[n] / 1e3


def test_candidates_are_the_current_width_then_narrower_teams():
    assert candidates({"host": 16}) == [{"host": 16}, {"host": 15}, {"host": 14}, {"host": 8}]
    assert candidates({"host": 2}) == [{"host": 2}, {"host": 1}]
    assert candidates({"host": 1}) == [{"host": 1}]
    assert candidates({"cpu": 4, "npu": 1})[1] == {"cpu": 3, "npu": 1}


def test_a_narrower_team_measured_faster_is_kept(monkeypatch):
    host = _Host(monkeypatch, {16: 9.0, 15: 7.0, 14: 7.2, 8: 12.0})
    choice = choose_threads(host.step, {"host": 16}, host.apply)
    assert dict(choice.threads) == {"host": 15} and host.applied[-1] == {"host": 15}
    assert choice.median_ms == pytest.approx(
        {"16 threads": 9.0, "15 threads": 7.0, "14 threads": 7.2, "8 threads": 12.0}
    )
    assert choice.note().startswith("host threads: 15 threads chosen (15 threads 7.000 ms")


def test_the_current_width_stays_unless_another_beats_it_by_the_margin(monkeypatch):
    host = _Host(monkeypatch, {2: 5.0, 1: 4.9})  # 2% faster: within the box's noise
    assert dict(choose_threads(host.step, {"host": 2}, host.apply).threads) == {"host": 2}
    assert host.applied[-1] == {"host": 2}


def test_a_failing_step_puts_the_counts_back(monkeypatch):
    host = _Host(monkeypatch, {2: 5.0, 1: 4.0})

    def step() -> None:
        if host.applied[-1] == {"host": 1}:
            raise RuntimeError("worker lost")
        host.step()

    with pytest.raises(RuntimeError, match="worker lost"):
        choose_threads(step, {"host": 2}, host.apply)
    assert host.applied[-1] == {"host": 2}


def test_one_core_has_nothing_to_choose(monkeypatch):
    host = _Host(monkeypatch, {1: 5.0})
    choice = choose_threads(host.step, {"host": 1}, host.apply)
    assert dict(choice.threads) == {"host": 1} and not choice.median_ms and not host.applied
