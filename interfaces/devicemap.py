"""A plan as the `device_map` Hugging Face accelerate (and transformers' `from_pretrained`)
take: module path -> where its weights live ("cuda:0", "cpu", "npu:0").

Where the weights live, not where the math runs: a partition resident on GPU i is
"cuda:i"; a streamed or split partition keeps its weights in host memory and copies them
in as they are needed, which accelerate calls CPU offload: "cpu"; a CPU partition, and an
emulated NPU's (it runs on the host), "cpu". The map is as coarse as it can be: a module
whose every tensor lives in one place is one entry (one device for the whole model: {"":
device}), the way accelerate's own `infer_auto_device_map` writes it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.plan import Plan


def device_map(model: torch.nn.Module, graph: OpGraph, plan: Plan, cluster: ClusterSpec) -> dict:
    """`plan` of `model` (captured as `graph`) as an accelerate device_map."""
    hosts = sorted({cluster.device(p.device).host for p in plan.partitions})
    if len(hosts) > 1:
        raise ConfigError(
            f"an accelerate device_map describes one machine; this plan spans hosts "
            f"{', '.join(hosts)} (plan for one host's cluster to export one)"
        )
    placed: dict[str, str] = {}  # tensor name -> device, in the plan's (topological) order
    for p in plan.partitions:
        where = accelerate_device(cluster.device(p.device), p.weights)
        for name in p.nodes:
            if name not in graph.nodes:
                continue
            for placeholder in graph[name].params:
                fqn = graph.params.get(placeholder, (None, 0))[0]
                if fqn is not None:
                    placed.setdefault(fqn, where)
    sizes = {
        name: t.numel() * t.element_size() for name, t in model.state_dict(keep_vars=True).items()
    }
    tensors = {name: placed.get(name) for name in sizes}
    _fill(tensors, sizes)
    return _compact(tensors, set(dict(model.named_modules())))


def accelerate_device(device: DeviceSpec, weights: str) -> str:
    """Where a partition's weights live, in accelerate's words."""
    if device.kind == "gpu" and weights == "resident":
        return f"cuda:{device.index}"
    if device.kind == "npu" and not device.emulated and weights == "resident":
        return f"npu:{device.index}"
    return "cpu"


def _fill(tensors: dict[str, Any], sizes: dict[str, int]) -> None:
    """Tensors no op reads (unused, or tied to one that is read) go where most of their
    module's tensors went, else where most of the model's did."""

    def majority(names: list[str]) -> str | None:
        weight: dict[str, int] = defaultdict(int)
        for n in names:
            if tensors[n] is not None:
                weight[tensors[n]] += sizes[n] + 1
        return max(weight, key=weight.__getitem__) if weight else None

    overall = majority(list(tensors)) or "cpu"
    for name in [n for n, d in tensors.items() if d is None]:
        parts = name.split(".")[:-1]
        found = None
        while parts and found is None:
            prefix = ".".join(parts) + "."
            found = majority([n for n in tensors if n.startswith(prefix)])
            parts.pop()
        tensors[name] = found or overall


def _compact(tensors: dict[str, str], modules: set[str]) -> dict:
    """The fewest entries: a module whose tensors all live in one place is one entry."""
    out: dict[str, str] = {}

    def under(prefix: str) -> list[str]:
        return [n for n in tensors if not prefix or n.startswith(prefix + ".")]

    def visit(prefix: str) -> None:
        names = under(prefix)
        places = {tensors[n] for n in names}
        if len(places) == 1:
            out[prefix] = places.pop()
            return
        depth = len(prefix.split(".")) if prefix else 0
        children = dict.fromkeys(".".join(n.split(".")[: depth + 1]) for n in names)
        for child in children:
            if child in tensors and child not in modules:
                out[child] = tensors[child]  # a module's own tensor, beside mixed children
            else:
                visit(child)

    visit("")
    return out
