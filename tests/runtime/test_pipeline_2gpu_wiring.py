"""How stage packets travel in the compiled graph (runtime/dag.py `wiring`): NCCL between
GPU stages of different workers, in-process between stages of one worker, Ray's shared
memory everywhere else; and the executor reports it. No GPU needed: the specs only say
"gpu"."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hetero.cluster.spec import DeviceSpec
from hetero.runtime.dag import NCCL, SHM, wiring
from hetero.runtime.stage import StageSpec


def _on(stage: StageSpec, device: DeviceSpec) -> StageSpec:
    return dataclasses.replace(stage, device=device)


def _gpu(stage: StageSpec, name: str) -> DeviceSpec:
    return dataclasses.replace(stage.device, name=name, kind="gpu")


def test_cpu_and_npu_stages_use_shared_memory(staged):
    stages, needed, *_ = staged
    w = wiring(stages, needed)
    assert w.leaves == (2,)
    assert set(w.transports.values()) == {SHM}
    assert all(w.host_out.values())
    assert [r.index for r in w.readers[0]] == [1]


def test_two_gpus_send_over_nccl_and_the_last_stage_returns_host_tensors(staged):
    stages, needed, *_ = staged
    two = [
        _on(stages[0], _gpu(stages[0], "node0/gpu0")),
        _on(stages[1], _gpu(stages[1], "node0/gpu1")),
        _on(stages[2], _gpu(stages[2], "node0/gpu1")),
    ]
    w = wiring(two, needed)
    assert w.transports == {0: NCCL, 1: SHM, 2: SHM}
    assert w.host_out == {0: False, 1: False, 2: True}  # 1 -> 2 stays on gpu1, in-process


def test_readers_in_the_same_worker_only_never_get_an_nccl_channel(staged):
    # Ray asserts an accelerator channel has a reader in another actor (streamed pieces of
    # one partition are stages of one GPU worker)
    stages, needed, *_ = staged
    one = [_on(s, _gpu(stages[0], "node0/gpu0")) for s in stages]
    w = wiring(one, needed)
    assert set(w.transports.values()) == {SHM}
    assert w.host_out == {0: False, 1: False, 2: True}


def test_a_cpu_reader_gets_host_tensors_over_shared_memory(staged):
    stages, needed, *_ = staged
    mixed = [_on(stages[0], _gpu(stages[0], "node0/gpu0")), *stages[1:]]
    w = wiring(mixed, needed)
    assert w.transports[0] == SHM and w.host_out[0]


@pytest.mark.ray
@pytest.mark.timeout(240)
def test_ray_executor_reports_its_transports(ray_cluster, staged, cluster):
    from hetero.runtime.ray_executor import RayExecutor

    stages, needed, inputs, expected = staged
    with RayExecutor(stages, needed, cluster=cluster, timeout_s=60, export_metrics=False) as ex:
        assert ex.transports == {0: SHM, 1: SHM, 2: SHM}
        outs = ex.run_many([inputs] * 3)
        for out in outs:
            torch.testing.assert_close(out[needed[0]], expected)
    assert ex.transports == {}  # shut down: no graph
