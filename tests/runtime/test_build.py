"""runtime.build: compiling a plan's partitions; what a CPU partition of a GPU model gets."""

from __future__ import annotations

import torch

from hetero.runtime.build import retarget


def test_host_graph_moves_factory_devices_and_constants_to_the_host():
    """A graph captured on a GPU makes its position ids with arange(device=cuda:0); a CPU
    partition of it must make them on the host. (No GPU needed: only the graph changes.)"""
    g = torch.fx.Graph()
    x = g.placeholder("x")
    pos = g.call_function(torch.ops.aten.arange.start, (0, 4), {"device": torch.device("cuda", 0)})
    const = g.get_attr("table")
    y = g.call_function(torch.ops.aten.add.Tensor, (x, pos))
    g.output((g.call_function(torch.ops.aten.add.Tensor, (y, const)),))
    root = torch.nn.Module()
    root.table = torch.ones(4)
    gm = torch.fx.GraphModule(root, g)
    retarget(gm, torch.device("cpu"))
    devices = [n.kwargs.get("device") for n in gm.graph.nodes if "device" in n.kwargs]
    assert devices == [torch.device("cpu")]
    (out,) = gm(torch.zeros(4))
    assert out.tolist() == [1.0, 2.0, 3.0, 4.0]
