"""hetero.compile(feedback=True) in one process: a partition slowed on purpose (an injected
delay that starts while the model serves) is re-planned away from, the switch shows in the
metrics and the plan's notes, and no request is lost or answered wrong. Then the model's run
log folds into a profile with `hetero calibrate --from-runs`."""

from __future__ import annotations

import threading

import pytest
import torch
from typer.testing import CliRunner

import hetero
from hetero.backends.base import CompileOptions
from hetero.backends.registry import default_registry
from hetero.calibration.feedback import error_table
from hetero.cluster.profile import CalibrationProfile
from hetero.cluster.runs import RunLog
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.cli import app
from hetero.interfaces.models import mlp_block
from hetero.runtime.online import ReplanPolicy
from hetero.runtime.testing import EXTRA_BACKENDS

# The NPU looks twice as fast as the CPU on paper, so the model is planned onto it; its
# backend (faulty) sleeps 25 ms per call once it has served a few.
SLOW_NPU = {
    "name": "slow-npu",
    "hosts": [
        {
            "name": "box",
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "cores": 2,
                    "peak_flops": {"float32": "50 GFLOPS"},
                    "bandwidth": "20 GB/s",
                    "memory": "4 GB",
                },
                {
                    "name": "npu",
                    "kind": "npu",
                    "dtypes": ["float32"],
                    "peak_flops": {"float32": "100 GFLOPS"},
                    "bandwidth": "20 GB/s",
                    "memory": "2 GB",
                    "launch_overhead": "20 us",
                },
            ],
            "links": [{"between": ["cpu", "npu"], "bandwidth": "8 GB/s"}],
        }
    ],
}
DELAY = CompileOptions(extra=(("delay_ms", 25.0), ("delay_after", 6)))


def slowed(executor: str, policy: ReplanPolicy, cache_dir):
    model, x = mlp_block(batch=2, seq=16)
    cm = hetero.compile(
        model,
        x,
        cluster=ClusterSpec.from_dict(SLOW_NPU),
        backends={"cpu": "eager", "npu": "faulty"},
        registry=default_registry(EXTRA_BACKENDS),
        options={"faulty": DELAY},
        cache_dir=cache_dir,
        executor=executor,
        feedback=policy,
        cost_model=hetero.partitioner.cost.CostModel(),  # datasheet factors: no cached profile
    )
    with torch.no_grad():
        expected = model(*x)
    return cm, x, expected


def hammer(cm, x, expected, requests: int, threads: int = 2) -> list[bool]:
    """`requests` calls from `threads` threads at once; one bool per answer (right or not)."""
    answers: list[bool] = []
    lock = threading.Lock()

    def loop(n: int) -> None:
        for _ in range(n):
            ok = bool(torch.allclose(cm(*x), expected, atol=1e-5))
            with lock:
                answers.append(ok)

    workers = [threading.Thread(target=loop, args=(requests // threads,)) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
    return answers


@pytest.mark.timeout(120)
def test_a_slowed_partition_is_replanned_away_under_load(tmp_path):
    # min_ms: the injected 25 ms, not the emulated NPU's ordinary mispricing (its faulty
    # backend is eager on this CPU, priced as a faster chip), is what must trigger the switch
    # cooldown: one round in the 60 requests. The round's npu record mixes calls from before
    # the delay started (it prices the npu plan well under 25 ms), so a later round, with the
    # cpu plan timed on a loaded 2-core machine (the suite runs two workers), can switch back.
    policy = ReplanPolicy(warmup=4, window=8, cooldown=64, background=True, min_ms=5.0)
    cm, x, expected = slowed("local", policy, tmp_path / "cache")
    with cm:
        assert "box/npu" in {s.device.name for s in cm.stages}
        answers = hammer(cm, x, expected, 60)
        assert len(answers) == 60 and all(answers)  # none lost, none wrong
        events = cm.executor.metrics.replans
        assert "switched" in [e.outcome for e in events], cm.executor.metrics.table()
        assert "box/npu" not in {s.device.name for s in cm.stages}
        assert any(n.startswith("re-planned online after request") for n in cm.plan.notes)
        assert "re-planned online" in cm.plan.explain()
        assert "switched" in cm.executor.metrics.table()

        # the run log of what ran, folded by the CLI into a profile
        log = cm.run_log()
        assert log.partitions and {r.device for r in log.partitions} >= {"box/npu", "box/cpu"}
        path = tmp_path / "runs.json"
        log.to_json(path)
    out = tmp_path / "profile.json"
    result = CliRunner().invoke(app, ["calibrate", "--from-runs", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "median per-partition error" in result.output
    profile = CalibrationProfile.load(out)
    # the slowed partition is priced as measured (its record may mix calls from before its
    # 25 ms delay started; the others take < 3 ms)
    slow = [(m, p) for label, m, p in error_table(log, profile) if m > 0.005]
    assert slow and all(abs(p - m) / m < 0.25 for m, p in slow), error_table(log, profile)
    assert profile.runtime_for("local") is not None
    assert RunLog.load(path) == log


def test_online_replanning_is_for_forward_models():
    """A ReplanPolicy re-plans a served forward model; a generation's feedback is one
    measured round after the build (feedback=True), and the error says so."""
    with pytest.raises(hetero.ConfigError, match="feedback=True"):
        hetero.compile(torch.nn.Linear(2, 2), task="generate", feedback=ReplanPolicy())


def test_feedback_rounds_are_for_generations():
    """FeedbackRounds bounds a generation's measured rounds at compile; a forward model given
    one is told what re-plans it instead."""
    with pytest.raises(hetero.ConfigError, match="ReplanPolicy"):
        hetero.compile(
            torch.nn.Linear(2, 2), (torch.randn(1, 2),), feedback=hetero.FeedbackRounds()
        )
