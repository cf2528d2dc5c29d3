"""Which of a generation step's stages go to their Ray worker as one call (`stage_runs`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetero.backends.base import Artifact
from hetero.cluster.devices import DeviceSpec
from hetero.runtime.ray_generation import stage_runs
from hetero.runtime.stage import CALLER, StageSpec, producers, sources

GPU = DeviceSpec("n0/gpu", "gpu", "n0")
CPU = DeviceSpec("n0/cpu", "cpu", "n0")


def _stages(*spec: tuple[DeviceSpec, tuple[str, ...], tuple[str, ...]]) -> list[StageSpec]:
    art = Artifact("eager", "k", Path("."), {})
    return [StageSpec(i, dev, "eager", art, ins, outs) for i, (dev, ins, outs) in enumerate(spec)]


def _runs(stages: list[StageSpec], final: int):
    srcs = {s.index: sources(s, producers(stages)) for s in stages}
    return [
        (r.device, [m[0] for m in r.members], r.sources) for r in stage_runs(stages, srcs, final)
    ]


def test_a_chain_on_one_device_is_one_call_between_the_others():
    stages = _stages(
        (CPU, ("ids",), ("h0",)),
        (GPU, ("h0",), ("h1",)),
        (GPU, ("h1",), ("h2",)),
        (GPU, ("h2",), ("h3",)),
        (CPU, ("h3",), ("logits",)),
    )
    assert _runs(stages, final=4) == [
        ("n0/cpu", [0], (CALLER,)),
        ("n0/gpu", [1, 2, 3], (0,)),
        ("n0/cpu", [4], (3,)),
    ]


def test_a_value_read_on_another_device_ends_the_call_there():
    # stage 1's output is read by the CPU's stage 4 as well: its packet must leave
    stages = _stages(
        (CPU, ("ids",), ("h0",)),
        (GPU, ("h0",), ("h1",)),
        (GPU, ("h1",), ("h2",)),
        (GPU, ("h2",), ("h3",)),
        (CPU, ("h1", "h3"), ("logits",)),
    )
    assert _runs(stages, final=4) == [
        ("n0/cpu", [0], (CALLER,)),
        ("n0/gpu", [1], (0,)),
        ("n0/gpu", [2, 3], (1,)),
        ("n0/cpu", [4], (1, 3)),
    ]


def test_a_skip_inside_the_call_keeps_it_whole_and_the_final_stage_ends_one():
    # stage 1 is read by 2 and by 3 (a residual), all on the GPU; the final stage 3 is last
    stages = _stages(
        (GPU, ("ids",), ("h0",)),
        (GPU, ("h0",), ("h1",)),
        (GPU, ("h1",), ("h2",)),
        (GPU, ("h1", "h2"), ("logits",)),
    )
    runs = stage_runs(stages, {s.index: sources(s, producers(stages)) for s in stages}, 3)
    assert len(runs) == 1 and runs[0].last == 3
    # member 3 reads members 1 and 2 (as -1 - position), none from outside
    assert runs[0].members == ((0, (0,)), (1, (-1,)), (2, (-2,)), (3, (-2, -3)))
    assert runs[0].sources == (CALLER,)


@pytest.mark.parametrize("final", [1, 2])
def test_the_final_stage_is_never_inside_a_call(final):
    stages = _stages(
        (GPU, ("ids",), ("h0",)),
        (GPU, ("h0",), ("h1", "logits")),
        (GPU, ("h1",), ("h2",)),
    )
    runs = stage_runs(stages, {s.index: sources(s, producers(stages)) for s in stages}, final)
    assert any(r.last == final for r in runs)


def test_a_worker_runs_a_call_s_members_in_order_and_returns_the_last_packet():
    """`GenerationWorker.run_run` feeds each member the packets its sources name (the call's
    own, or earlier members'), keeps values on the device between members (host_out off)
    and moves only the last one's to the host."""
    from hetero.runtime.ray_generation import GenerationWorker
    from hetero.runtime.worker import Packet

    calls = []

    def runner(index):
        def run(packets, host_out):
            calls.append((index, [p.src for p in packets], host_out))
            return Packet(index, {f"h{index}": index}, {}, 0.0)

        return run

    worker = object.__new__(GenerationWorker)  # the call's wiring alone, no device
    worker.stages = {("decode", i): runner(i) for i in (1, 2, 3)}
    stages = _stages(
        (CPU, ("ids",), ("h0",)),
        (GPU, ("h0",), ("h1",)),
        (GPU, ("h1",), ("h2",)),
        (GPU, ("h0", "h1", "h2"), ("logits",)),
    )
    (_, run) = stage_runs(stages, {s.index: sources(s, producers(stages)) for s in stages}, 3)
    assert run.sources == (0,)
    out = worker.run_run("decode", run.members, Packet(0, {"h0": 0}, {}, 0.0))
    assert out.src == 3
    assert calls == [(1, [0], False), (2, [1], False), (3, [0, 1, 2], True)]
