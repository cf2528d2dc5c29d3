"""How a decode step's values cross between a GPU and its host CPU inside one process: a
value a GPU stage made reaches its GPU readers as that GPU's own tensor even when a CPU
stage reads it too, and a streamed stage's graphs read a CPU stage's output straight into
their buffers.

    python3 -m pytest -q tests/gpu/test_stage_handoffs_gpu.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from hetero.backends.base import Artifact
from hetero.cluster.devices import DeviceSpec
from hetero.runtime.cuda_graph import SlotGraphs
from hetero.runtime.executor import LocalExecutor
from hetero.runtime.stage import StageSpec

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

GPU = DeviceSpec("n0/gpu", "gpu", "n0", index=0)
CPU = DeviceSpec("n0/cpu", "cpu", "n0")


class _Seen:
    """A runner that records the inputs it was given and returns `fn` of them."""

    def __init__(self, fn):
        self.fn = fn
        self.inputs: list[torch.Tensor] = []

    def __call__(self, *xs):
        self.inputs = list(xs)
        return (self.fn(*xs),)


def test_a_value_read_on_the_host_and_the_gpu_reaches_the_gpu_as_its_own_tensor():
    art = Artifact("eager", "k", Path("."), {})
    stages = (
        StageSpec(0, GPU, "eager", art, ("x",), ("table",)),  # rotary tables, say
        StageSpec(1, CPU, "eager", art, ("table",), ("h",)),  # a CPU layer
        StageSpec(2, GPU, "eager", art, ("h", "table"), ("y",)),  # a GPU layer after it
    )
    made = _Seen(lambda x: x * 2)
    host = _Seen(lambda t: t + 1)
    gpu = _Seen(lambda h, t: h.to(t.device) * t)
    executor = LocalExecutor(stages, ("y",), runners={0: made, 1: host, 2: gpu})
    x = torch.arange(6.0, device="cuda")
    out = executor.run({"x": x})["y"]
    table = x * 2
    torch.testing.assert_close(out.to("cuda"), (table.cpu() + 1).to("cuda") * table)
    assert host.inputs[0].device.type == "cpu"  # the CPU stage reads the host's copy
    h, t = gpu.inputs
    assert h.device.type == "cpu"  # made on the host: read there (BoundRunner uploads it)
    assert t.device.type == "cuda"  # made on this GPU: never went there and back


def test_slot_graphs_read_a_host_input_straight_into_their_buffers():
    dev = torch.device("cuda", 0)
    w = torch.randn(16, 16, device=dev)
    graphs = SlotGraphs(lambda h, t, w: (torch.relu(h @ w) + t,), dev, acts=2)
    for k in range(6):  # captured once for w's address, then replayed
        h = torch.randn(4, 16).pin_memory() if k % 2 else torch.randn(4, 16)
        t = torch.randn(4, 16, device=dev)
        (got,) = graphs(h, t, w)
        torch.testing.assert_close(got, torch.relu(h.to(dev) @ w) + t)
    assert len(graphs.graphs) == 1 and graphs.failed is None
