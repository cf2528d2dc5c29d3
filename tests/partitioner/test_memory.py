"""The planner's activation memory: a liveness walk, checked against a hand count."""

from __future__ import annotations

import torch

from hetero.partitioner.coarsen import live_bytes
from hetero.partitioner.graph import capture

F32 = 4 * 8 * 4  # one float32[4, 8]


class Live(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor):
        a = x + 1  # add
        b = a * 2  # mul
        t = b.t()  # permute: a view, keeps b alive until t's last reader
        c = a + x  # add_1: last read of x and a
        d = t.sum()  # sum_1: last read of b (through t); a model output
        return self.lin(c), d  # permute_1 (a view of the weight), addmm


def graph():
    return capture(Live(), (torch.randn(4, 8),))


def test_liveness_walk_matches_hand_count():
    g = graph()
    live = live_bytes(g)
    targets = [g[n].target for n in g.order]
    assert targets == [
        "aten.add.Tensor",
        "aten.mul.Tensor",
        "aten.permute.default",
        "aten.add.Tensor",
        "aten.sum.dim_IntList",
        "aten.permute.default",
        "aten.addmm.default",
    ]
    # live while each op runs (inputs still needed + what it writes), by hand:
    expected = [
        2 * F32,  # add: x, a
        3 * F32,  # mul: x, a, b
        3 * F32,  # permute: allocates nothing
        4 * F32,  # add_1: x, a, b (still read through t), c  <- the peak
        2 * F32 + 4,  # sum_1: b, c, d (x and a died at add_1)
        F32 + 4,  # permute_1: c, d; a view of a weight is weights, not an activation
        2 * F32 + 4,  # addmm: c, d (an output: held to the end), its result
    ]
    assert [live[n] for n in g.order] == expected


def test_group_act_bytes_is_the_peak_not_the_largest_tensor():
    groups = graph().coarsen()
    by_name = {grp.name: grp for grp in groups}
    # the old estimate (largest single output) gave F32 for the root group
    assert by_name["(root)"].act_bytes == 4 * F32
    # the Linear's group still holds its input and the earlier output `d`
    assert by_name["lin"].act_bytes == 2 * F32 + 4


def test_problem_memory_counts_the_peak():
    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.adapter import build_problem
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.decisions import BackendAssignment

    cluster = ClusterSpec.from_dict(
        {
            "name": "one",
            "hosts": [
                {
                    "name": "h",
                    "devices": [
                        {"name": "cpu", "kind": "cpu", "bandwidth": "10 GB/s", "memory": "1 GB"}
                    ],
                }
            ],
        }
    )
    g = graph()
    groups = g.coarsen()
    problem, _ = build_problem(
        groups,
        cluster,
        CostModel(),
        backends=BackendAssignment.parse({"cpu": "eager"}),
        registry=default_registry(),
    )
    assert list(problem.act_bytes) == [grp.act_bytes for grp in groups]
    need = problem.memory(problem.allowed().argmax(axis=1))
    weights = 8 * 8 * 4 + 8 * 4
    assert need[0] == weights + 4 * F32
