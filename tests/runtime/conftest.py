"""Fixtures of the runtime tests: a tiny model split in stages (eager artifacts), a
two-host cluster description, and ONE Ray cluster for the whole session (two nodes on
this machine, one with an NPU resource) that every Ray test shares."""

from __future__ import annotations

import pytest
import torch
from rt_helpers import CLUSTER, make_stages

from hetero.cluster.devices import NPU_RESOURCE
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.models import mlp_block
from hetero.partitioner.graph import capture
from hetero.runtime.build import needed_outputs


@pytest.fixture(scope="session")
def cluster() -> ClusterSpec:
    return ClusterSpec.from_dict(CLUSTER)


@pytest.fixture(scope="session")
def mlp():
    """(model, example inputs, OpGraph) of a small MLP block (batch 2, seq 4)."""
    model, x = mlp_block(batch=2, seq=4)
    return model, x, capture(model, x)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("artifacts")


@pytest.fixture(scope="session")
def staged(mlp, cluster, cache_dir):
    """Three eager stages: head/cpu -> edge/npu -> edge/cpu, with the names they need."""
    model, x, graph = mlp
    stages = make_stages(graph, cluster, ["head/cpu", "edge/npu", "edge/cpu"], cache_dir)
    with torch.no_grad():
        expected = model(*x)
    inputs = {name: t for name, t in zip(graph.inputs, x, strict=True)}
    return stages, needed_outputs(graph), inputs, expected


STARTS = 3  # tries at starting the session's Ray cluster (see ray_cluster)
# What Ray raises when a node's processes were slower to start than its fixed waits
STARTUP_TIMEOUTS = ("timed out during startup", "Timed out waiting for file")


@pytest.fixture(scope="session")
def ray_cluster():
    """Head (4 CPUs) + a second node (2 CPUs, hetero_npu: 1), shared by every Ray test."""
    ray = pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    small = {"object_store_memory": 80 * 2**20}
    for attempt in range(STARTS):
        c = Cluster(initialize_head=False, connect=False)
        try:
            c.add_node(num_cpus=4, include_dashboard=False, **small)  # the first is the head
            c.add_node(num_cpus=2, resources={NPU_RESOURCE: 1}, **small)
            c.wait_for_nodes(timeout=60)
            c.connect()
            break
        except Exception as e:
            # Ray waits a fixed 30 s for a new raylet to register with the GCS; on the
            # 2-core CI machine, under both halves of the test suite, one start in about
            # three ran out of it ("The current node timed out during startup") and every
            # Ray test of the session errored. Another start then went through. The head's
            # GCS can be as slow to write its port file ("Timed out waiting for file").
            c.shutdown()
            if not any(m in str(e) for m in STARTUP_TIMEOUTS) or attempt == STARTS - 1:
                raise
    yield c
    ray.shutdown()
    c.shutdown()
