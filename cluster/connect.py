"""Connecting to Ray, or starting a private head that is safe by default: the one Ray
start-up every way in (and discovery over Ray) goes through."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "hetero"
_MIN_RAY_TOKEN_AUTH = (2, 52)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.split(".")[:2] if p.isdigit())


def safe_head_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for a Ray head hetero starts: token authentication on (Ray >= 2.52).

    An explicit RAY_AUTH_MODE in the environment is respected (and logged when it turns
    authentication off).
    """
    env = dict(os.environ if env is None else env)
    mode = env.get("RAY_AUTH_MODE")
    if mode is None:
        env["RAY_AUTH_MODE"] = "token"
    elif mode.lower() != "token":
        log.warning(
            "RAY_AUTH_MODE=%s: the Ray head hetero starts runs WITHOUT token authentication; "
            "anyone who reaches its ports can run code on it",
            mode,
        )
    return env


def init_ray(
    address: str | None = None,
    namespace: str = NAMESPACE,
    resources: dict[str, float] | None = None,
    **head: Any,
) -> None:
    """Connect to the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379").

    Without an address, start a private head for this process (never joining a cluster
    some other process started), with no dashboard (so no job API) and with Ray's token
    authentication turned on: every RPC to it must carry the token. Ray itself replaces a
    loopback node address with the machine's routable one (services.resolve_ip_for_localhost),
    so its GCS and raylet ports are reachable from the network; the token is what guards them.
    `resources` and `head` (more ray.init arguments: num_cpus, runtime_env, ...) shape that
    private head. Does nothing when Ray is already initialised in this process.
    """
    local = address in (None, "", "local")
    if local and "ray" not in sys.modules:
        os.environ.update(safe_head_env())  # read when Ray loads its config
    import ray  # optional (hetero[ray]) and heavy: loaded only when a Ray cluster is wanted

    if ray.is_initialized():
        return
    if local:
        if _version(ray.__version__) < _MIN_RAY_TOKEN_AUTH:
            log.warning(
                "Ray %s has no token authentication (needs >= 2.52): anyone who reaches "
                "this machine's Ray ports can run code on it",
                ray.__version__,
            )
        os.environ.update(safe_head_env())
        _refresh_ray_config()
        ray.init(
            **{
                "include_dashboard": False,
                "log_to_driver": False,
                **head,
                "address": "local",  # a new head, never a cluster some other process started
                "namespace": namespace,
                "resources": resources or None,  # e.g. {"NPU": 1} for emulated NPUs here
            }
        )
    else:
        ray.init(address=address, namespace=namespace, log_to_driver=False)


def _refresh_ray_config() -> None:
    """Make an already imported Ray see RAY_AUTH_MODE (Ray reads it once, on import)."""
    try:
        from ray._raylet import Config  # Ray's private config; absent in some versions

        Config.initialize("")
    except (ImportError, AttributeError, TypeError):  # other Ray versions: env read at init
        pass
