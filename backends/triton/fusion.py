"""The fusion pass: walk a partition's ATen graph in order and cut it into steps.

Each node goes to the first rule of `patterns.RULES` that matches it (the way TVM's dlight
tries schedule rules in order); the last rule, `Fallback`, always matches and runs the
node as an ATen call. A step is a fused group (one generated Triton kernel) or one ATen
call; `FusionPlan.steps` is their launch order.

Values inside a group are addressed by their flat row-major index, so a group is a set of
nodes over one iteration space:
  pointwise  (numel,)     elementwise ops (and reshapes/casts of them)
  rowwise    (rows, cols) reductions over the last dim with their producers and consumers
  matmul     (batch, M, N) mm/addmm/bmm with an elementwise epilogue
  gated      (1, M, N) two mm over one A (gate and up) with the epilogue combining them
  attention  (B, H, M, N) one scaled_dot_product_attention node
  decode     (B, H, M, N) one SDPA with few queries and many keys, split over the keys
  rotary     (numel,) rotary-embedding patterns sharing cos and sin (query and key)
  conv       (numel,) one convolution (ATen, cuDNN) with an elementwise epilogue
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

KINDS = ("pointwise", "rowwise", "matmul", "gated", "attention", "decode", "rotary", "conv", "aten")


def val(node: Node) -> object:
    return node.meta.get("val")


def shape(node: Node) -> tuple[int, ...]:
    v = val(node)
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else ()


def numel(node: Node) -> int:
    return math.prod(shape(node))


def dtype(node: Node) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def is_tensor(node: object) -> bool:
    return isinstance(node, Node) and isinstance(val(node), torch.Tensor)


@dataclass(frozen=True)
class Group:
    """One step: a fused kernel (or one ATen call) and the values it hands to later steps."""

    kind: str
    rule: str  # the rule that anchored it, for the plan table
    nodes: tuple[Node, ...]
    outputs: tuple[Node, ...]
    space: tuple[int, ...]

    @property
    def anchor(self) -> Node:
        return self.nodes[0]


@dataclass
class OpenGroup:
    """A group still taking nodes (private to one run of the pass)."""

    kind: str
    rule: str
    space: tuple[int, ...]
    nodes: list[Node] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.space)

    def where(self, node: Node) -> str | None:
        """Which part of the space a value of `node`'s size spans: 'full', 'row' or None."""
        n = numel(node)
        if n == self.numel:
            return "full"
        if self.kind == "rowwise" and n == self.space[0]:
            return "row"
        if self.kind in ("matmul", "gated") and n == self.space[0] * self.space[1]:
            return "row"  # one value per row of A (an RMSNorm prologue)
        return None


class FusionState:
    """What the rules see: open groups and which group holds each node."""

    def __init__(self) -> None:
        self.open: list[OpenGroup] = []
        self.member: dict[Node, OpenGroup] = {}

    def groups_read_by(self, node: Node) -> list[OpenGroup]:
        out: list[OpenGroup] = []
        for a in node.all_input_nodes:
            g = self.member.get(a)
            if g is not None and g in self.open and g not in out:
                out.append(g)
        return out


@dataclass(frozen=True)
class Match:
    """A rule's answer: join an open group, start a new one of `kind`, or run as ATen."""

    rule: str
    kind: str
    join: OpenGroup | None = None
    space: tuple[int, ...] = ()
    close_now: bool = False  # a group that takes no more nodes (attention)


@dataclass(frozen=True)
class FusionPlan:
    module: GraphModule
    steps: tuple[Group, ...]

    def kernels(self) -> int:
        return sum(1 for s in self.steps if s.kind != "aten")

    def table(self) -> str:
        """One line per step: kind, rule, nodes."""
        rows = []
        for i, s in enumerate(self.steps):
            names = ", ".join(n.name for n in s.nodes)
            rows.append(f"{i:4d}  {s.kind:9s} {s.rule:12s} {names}")
        return "\n".join(rows)


def getitem_of(node: Node) -> tuple[Node, int] | None:
    if node.op == "call_function" and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return None
