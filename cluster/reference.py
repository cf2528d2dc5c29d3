"""How a person names a cluster, and the one parser every way in uses.

a ClusterSpec             itself
None, "local"             this machine (ClusterSpec.local)
"ray", "auto"             the running Ray cluster this process can reach
"ray://host:10001"        a Ray client address; "host:6379" a GCS address
"path/to/cluster.yaml"    a cluster file (a path object: any file name)
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError

LOCAL, RAY, FILE = "local", "ray", "file"
RAY_ADDRESS = re.compile(r"^(ray|auto|ray://.+|[A-Za-z0-9_.-]+:\d+)$")


def reference_kind(ref: str) -> str:
    """LOCAL, RAY or FILE; a ValueError saying what a reference looks like otherwise."""
    if ref == LOCAL:
        return LOCAL
    if RAY_ADDRESS.match(ref):
        return RAY
    if ref.endswith((".yaml", ".yml")):
        return FILE
    raise ValueError(
        "expected a cluster file (.yaml), `local`, `auto` or a Ray address "
        f"(`ray://host:10001`, `host:6379`); got {ref!r}"
    )


def resolve_cluster(
    ref: ClusterSpec | str | os.PathLike[str] | None, where: str = "cluster"
) -> ClusterSpec:
    """The ClusterSpec `ref` names (see the module's table)."""
    if isinstance(ref, ClusterSpec):
        return ref
    if ref is None:
        return ClusterSpec.local()
    if not isinstance(ref, str):
        return ClusterSpec.from_yaml(Path(ref))
    try:
        kind = reference_kind(ref)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None
    if kind == LOCAL:
        return ClusterSpec.local()
    if kind == RAY:
        return ClusterSpec.from_ray(None if ref in ("ray", "auto") else ref)
    return ClusterSpec.from_yaml(ref)
