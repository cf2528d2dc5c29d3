"""CompileClock / CompileTimes: phases counted exclusively, a backend's report folded in,
the note and the JSON form."""

from __future__ import annotations

import time

import torch

from hetero.compile_times import CompileClock


def test_nested_phases_count_once_and_reports_fold_in():
    clock = CompileClock()
    with clock.phase("choice"):
        time.sleep(0.02)
        with clock.phase("triton"):
            time.sleep(0.05)
    clock.add("triton", runs=0, parts={"autotune": 0.06}, counts={"kernels": 3, "configs": 12})
    times = clock.times()
    assert 0.045 <= times.seconds("triton") < times.total_s
    # its nested compile is not its own: counted in both, the two would outgrow the whole
    # (a bound on wall time instead failed where a loaded box oversleeps)
    assert times.seconds("choice") >= 0.015
    assert times.seconds("choice") + times.seconds("triton") <= times.total_s + 1e-9
    assert sum(p.seconds for p in times.phases) + times.other_s == times.total_s
    (triton,) = [p for p in times.phases if p.name == "triton"]
    assert triton.runs == 1 and dict(triton.counts) == {"kernels": 3, "configs": 12}
    note = times.note()
    # the phase's own seconds as measured (a loaded box oversleeps: 0.3 s in a clean CI),
    # its folded-in part and counts as added
    triton_s = f"{times.seconds('triton'):.1f}"
    assert note.startswith("compile ")
    assert f"triton {triton_s} (autotune 0.1; 3 kernels, 12 configs)" in note
    row = times.to_dict()
    assert [p["name"] for p in row["phases"]] == ["triton", "choice"]
    assert row["phases"][0]["counts"] == {"kernels": 3, "configs": 12}


def test_hetero_compile_reports_its_phases(tmp_path):
    import hetero

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval()
    x = torch.randn(2, 8)
    with hetero.compile(
        model, (x,), cache_dir=tmp_path, executor="local", choose="fixed",
        backends={"cpu": "eager"},
    ) as cm:  # fmt: skip
        first = cm.compile_times
        assert {"export", "plan", "eager", "load"} <= {p.name for p in first.phases}
        assert first.note() in cm.plan.explain()
    with hetero.compile(
        model, (x,), cache_dir=tmp_path, executor="local", choose="fixed",
        backends={"cpu": "eager"},
    ) as again:  # fmt: skip
        hits = [p for p in again.compile_times.phases if p.name == "cache hits"]
        assert hits and dict(hits[0].counts)["artifacts"] >= 1
        assert "eager" not in {p.name for p in again.compile_times.phases}
