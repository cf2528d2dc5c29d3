"""Where hetero keeps what it caches: one root for everything.

    <root>/<backend>-<hash>/        compiled partitions (backends/cache.py, by content key)
    <root>/.tuning/<target hash>/   TVM MetaSchedule records (backends/tvm/tune.py)
    <root>/triton-autotune/         Triton tile choices (backends/triton)
    <root>/profiles/<cluster>.json  calibration profiles (cluster/profile.py)

The root is $HETERO_CACHE_DIR, else the user's cache directory (~/.cache/hetero on Linux);
`hetero.compile(cache_dir=...)`, a deploy config's `cache_dir:` and `ArtifactCache(root)`
name another. A default `ArtifactCache()` and `hetero.compile` use the same folder. The
artifact cache creates the root 0700 and signs its manifests with a key kept outside it
(backends/signing.py: `$HETERO_KEY_FILE`, refused when it lies inside the cache).
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


def tuning_dir(root: str | os.PathLike[str] | None = None) -> Path:
    """TVM's tuning records under the cache root."""
    return cache_root(root) / ".tuning"


def profile_path(cluster_name: str, root: str | os.PathLike[str] | None = None) -> Path:
    """The calibration profile of a cluster, by its name, under the cache root."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in cluster_name)
    return cache_root(root) / "profiles" / f"{safe}.json"
