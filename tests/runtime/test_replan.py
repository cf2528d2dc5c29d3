"""A node leaves the Ray cluster under a running request loop: the executor re-plans
onto the devices that remain, switches between requests, and every later answer is right."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch
from rt_helpers import make_stages

from hetero.cluster.spec import ClusterSpec
from hetero.errors import WorkerError
from hetero.runtime.build import needed_outputs

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.timeout(240)]

CPU = {"kind": "cpu", "cores": 1, "bandwidth": "20 GB/s", "memory": "4 GB"}
SPEC = {
    "name": "head-and-far",
    "hosts": [
        {"name": "head", "devices": [{"name": "cpu", **CPU}]},
        {"name": "far", "devices": [{"name": "cpu", **CPU}]},
    ],
    "network": {"bandwidth": "1 GB/s", "latency": "100 us"},
}


def test_node_removed_under_request_loop_replans(ray_cluster, mlp, tmp_path, caplog):
    from hetero.runtime.ray_executor import RayExecutor

    model, x, graph = mlp
    far = ray_cluster.add_node(num_cpus=1, object_store_memory=80 * 2**20)
    ray_cluster.wait_for_nodes(timeout=60)
    spec = ClusterSpec.from_dict(SPEC)
    stages = make_stages(graph, spec, ["head/cpu", "far/cpu", "head/cpu"], tmp_path)
    asked: list[ClusterSpec] = []

    def replan(remaining: ClusterSpec):
        asked.append(remaining)
        return make_stages(graph, remaining, ["head/cpu"] * 3, tmp_path)

    ex = RayExecutor(
        stages,
        needed_outputs(graph),
        cluster=spec,
        replan=replan,
        node_map={"far": far.node_id},
        timeout_s=15.0,
        restart_timeout_s=10.0,
    )
    assert ex.placement["far/cpu"] == far.node_id
    with torch.no_grad():
        expected = model(*x)
    inputs = dict(zip(graph.inputs, x, strict=True))
    answers: list[tuple[int, bool]] = []  # (deployment generation, correct?)
    stop = threading.Event()

    def loop() -> None:
        deadline = time.monotonic() + 150
        while not stop.is_set() and time.monotonic() < deadline:
            generation = len(ex.history)
            try:
                out = ex.run(inputs)
                ok = torch.allclose(out[ex.needed_outputs[0]], expected, atol=1e-5)
            except WorkerError:
                ok = False
            answers.append((max(generation, len(ex.history)), ok))
            if sum(g == 1 for g, _ in answers) >= 5:
                return

    caplog.set_level(logging.WARNING, logger="hetero.runtime")
    worker = threading.Thread(target=loop, daemon=True)
    try:
        worker.start()
        while len(answers) < 3 and worker.is_alive():
            time.sleep(0.05)
        ray_cluster.remove_node(far)
        worker.join(timeout=180)
    finally:
        stop.set()
        ex.shutdown()
    assert not worker.is_alive()
    assert len(ex.history) == 1
    assert [d.name for d in asked[0].devices] == ["head/cpu"]
    assert {s.device.name for s in ex.stages} == {"head/cpu"}
    after = [ok for g, ok in answers if g == 1]
    assert len(after) >= 5 and all(after)
    assert all(ok for g, ok in answers if g == 0)
    log = caplog.text
    assert "devices gone for good: far/cpu" in log and "before:" in log and "after:" in log
