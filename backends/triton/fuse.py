"""The fusion pass: walk a partition's ATen graph in order and cut it into steps.

Each node goes to the first rule of `patterns.RULES` that matches it (the way TVM's dlight
tries schedule rules in order); the last rule, `Fallback`, always matches and runs the node
as an ATen call. The groups it forms and the helpers the rules read are in fusion.py (which
the rules import, so the pass lives here: no import cycle).
"""

from __future__ import annotations

from torch.fx import GraphModule

from hetero.backends.triton.fusion import FusionPlan, FusionState, Group, OpenGroup, shape
from hetero.backends.triton.patterns import RULES


def fuse(gm: GraphModule) -> FusionPlan:
    """Cut `gm` (core ATen, meta['val'] on every node) into fused groups and ATen calls."""
    st = FusionState()
    steps: list[Group] = []

    def close(g: OpenGroup) -> None:
        st.open.remove(g)
        members = set(g.nodes)
        outs = tuple(n for n in g.nodes if any(u not in members for u in n.users))
        steps.append(Group(g.kind, g.rule, tuple(g.nodes), outs, g.space))

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "output":
            break
        m = next(m for rule in RULES if (m := rule.match(node, st)) is not None)
        target = m.join
        for g in st.groups_read_by(node):
            if g is not target:
                close(g)
        if target is None and m.kind != "aten":
            target = OpenGroup(m.kind, m.rule, m.space)
            st.open.append(target)
        if target is None:
            steps.append(Group("aten", m.rule, (node,), (node,), shape(node)))
            continue
        if m.join is not None and m.kind != target.kind:  # a pointwise group becomes rowwise
            target.kind, target.rule, target.space = m.kind, m.rule, m.space
        target.nodes.append(node)
        st.member[node] = target
        if m.close_now:
            close(target)
    for g in list(st.open):
        close(g)
    return FusionPlan(gm, tuple(steps))
