"""Capture a model into an OpGraph, cost it, partition it into a Plan."""

from hetero.partitioner.coarsen import Group, GroupGraph, coarsen
from hetero.partitioner.graph import OpGraph, OpNode, TensorMeta, capture
from hetero.partitioner.split import Partition, check_assignment, run_partitions, split

__all__ = [
    "Group",
    "GroupGraph",
    "OpGraph",
    "OpNode",
    "Partition",
    "TensorMeta",
    "capture",
    "check_assignment",
    "coarsen",
    "run_partitions",
    "split",
]
