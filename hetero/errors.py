"""Exception families. Every message says what was wrong, where, and what to do."""

from __future__ import annotations


class HeteroError(Exception):
    """Base of every error hetero raises on purpose."""


class ConfigError(HeteroError):
    """A cluster description or deploy config is malformed (names the file and the key)."""


class CaptureError(HeteroError):
    """torch.export could not capture the model (names the model and the cause)."""


class PartitionError(HeteroError):
    """An assignment of nodes to partitions is not valid (names the nodes)."""


class PlanInfeasible(HeteroError):
    """No placement satisfies the constraints (says which device lacks what)."""


class UnsupportedOpError(HeteroError):
    """Ops no backend of the chosen device can run (lists every op with its source line)."""


class CompileError(HeteroError):
    """A backend failed to compile a partition (names the partition, backend and device)."""


class ArtifactCorrupt(HeteroError):
    """A cached artifact failed its hash check; it is never loaded."""


class WorkerError(HeteroError):
    """A device worker failed while running a partition (names the partition and device)."""


class InvalidInput(HeteroError, ValueError):
    """A caller's input is wrong: its name, dtype, shape or a value (an index out of its
    table's range, a bool byte other than 0/1, ...). Names the input, the position and the
    bound. Nothing was run; the deployment is unaffected (gRPC INVALID_ARGUMENT)."""


class Unavailable(HeteroError):
    """The model cannot run requests now: still loading, recovering from a fault, or with
    no device left that can run it (says which). Retry later (gRPC UNAVAILABLE)."""
