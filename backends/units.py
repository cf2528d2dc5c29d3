"""CompileUnits from a captured graph: cut it, run it eagerly once, hand each piece its examples.

`CompileUnit.from_partition` needs example values of a partition's inputs; `example_env`
gives them all (every value the partitions exchange), the way `run_partitions` computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from hetero.backends.base import CompileUnit
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.split import Partition, eager_values, param_values, split


def example_env(
    graph: OpGraph, parts: Sequence[Partition], *args: Any, **kwargs: Any
) -> dict[str, Any]:
    """Every value the partitions read or write (inputs, parameters, outputs), by name."""
    return eager_values(graph, parts, *args, **kwargs)


def contiguous_cut(graph: OpGraph, pieces: int) -> dict[str, int]:
    """An assignment cutting the graph's topological order into `pieces` equal runs."""
    order = graph.order
    n = max(1, min(pieces, len(order)))
    return {name: i * n // len(order) for i, name in enumerate(order)}


def units_for(
    graph: OpGraph, assignment: Mapping[str, int], *args: Any, **kwargs: Any
) -> tuple[list[Partition], list[CompileUnit], dict[str, Any]]:
    """Split by `assignment`, run once eagerly, and build one CompileUnit per partition."""
    parts = split(graph, assignment)
    env = example_env(graph, parts, *args, **kwargs)
    params = param_values(graph)
    units = [CompileUnit.from_partition(p, env, params) for p in parts]
    return parts, units, env
