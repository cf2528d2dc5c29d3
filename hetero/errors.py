"""Exception families. Every message says what was wrong, where, and what to do."""

from __future__ import annotations

import os
import sysconfig
import traceback


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


def user_frame(error: BaseException) -> traceback.FrameSummary | None:
    """The deepest frame of `error`'s traceback in the user's own code: not the standard
    library, not an installed package, not hetero. None when every frame is one of those."""
    frames = traceback.extract_tb(error.__traceback__)
    for frame in reversed(frames):
        if not _library(frame.filename):
            return frame
    return None


def where_raised(error: BaseException) -> str:
    """` at <file>:<line> in <function>:\\n    <source>` for the user's frame, or ''."""
    frame = user_frame(error)
    if frame is None:
        return ""
    source = f"\n    {frame.line.strip()}" if frame.line else ""
    return f" at {frame.filename}:{frame.lineno} in {frame.name}{source}"


def _library(filename: str) -> bool:
    if filename.startswith("<"):  # <string>, <frozen ...>: no file of the user's
        return True
    path = os.path.realpath(filename)
    return path.startswith(_LIBRARY_DIRS) or "site-packages" in path or "dist-packages" in path


# The standard library, and hetero's own folders (each top-level folder is a subpackage).
_LIBRARY_DIRS: tuple[str, ...] = tuple(
    os.path.realpath(p) + os.sep
    for p in {
        sysconfig.get_paths()["stdlib"],
        sysconfig.get_paths()["platstdlib"],
        *(
            os.path.join(os.path.dirname(os.path.dirname(__file__)), d)
            for d in (
                "hetero",
                "cluster",
                "partitioner",
                "backends",
                "calibration",
                "runtime",
                "interfaces",
            )
        ),
    }
)
