"""Where hetero keeps what it caches: one root, one folder per kind of thing.

    <root>/artifacts/<key>/        compiled partitions (backends/cache.py)
    <root>/artifacts/.tuning/      TVM MetaSchedule records (backends/tvm/tune.py)
    <root>/profiles/<cluster>.json calibration profiles (cluster/profile.py)

The root is $HETERO_CACHE_DIR, else the user's cache directory (~/.cache/hetero on Linux);
`hetero.compile(cache_dir=...)` and a deploy config's `cache_dir:` name another root.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

ENV_VAR = "HETERO_CACHE_DIR"


def cache_root(root: str | os.PathLike[str] | None = None) -> Path:
    """`root` when given, else $HETERO_CACHE_DIR, else the user's cache directory."""
    if root is not None:
        return Path(root).expanduser()
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(platformdirs.user_cache_dir("hetero"))


def artifacts_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """Compiled artifacts under the cache root `root` (see `cache_root`)."""
    return cache_root(root) / "artifacts"


def profile_path(cluster_name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The calibration profile of a cluster, by its name, under the cache root."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cluster_name)
    return cache_root(root) / "profiles" / f"{safe}.json"
