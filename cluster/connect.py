"""Connecting to Ray, or starting a private head that is safe by default: the one Ray
start-up every way in (and discovery over Ray) goes through."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

log = logging.getLogger(__name__)

NAMESPACE = "hetero"
LOOPBACK = "127.0.0.1"
_LOOPBACKS = ("127.0.0.1", "localhost")
_RAY_CLUSTER_SWITCH = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # Ray's "node on loopback" switch
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
    host: str = LOOPBACK,
    **head: Any,
) -> None:
    """Connect to the Ray cluster at `address` ("auto", "ray://host:10001", "host:6379").

    Without an address, start a private head for this process (never joining a cluster
    some other process started), with no dashboard (so no job API) and with Ray's token
    authentication turned on: every RPC to it must carry the token. The head advertises
    `host`, 127.0.0.1 unless told otherwise: its metrics exporters (which Ray binds to
    0.0.0.0 without authentication for any other address) then listen on loopback alone,
    and no other node can join it. Ray itself would replace a loopback address with the
    machine's routable one (services.resolve_ip_for_localhost); `_pin_to_loopback` uses
    the switch Ray has for that on macOS and Windows. `resources` and `head` (more
    ray.init arguments: num_cpus, runtime_env, ...) shape that private head. Does nothing
    when Ray is already initialised in this process.

    Call it from the main thread: Ray ties the head's processes to the thread that starts
    them (they die when it ends).
    """
    local = address in (None, "", "local")
    if local and "ray" not in sys.modules:
        os.environ.update(safe_head_env())  # read when Ray loads its config
        if host in _LOOPBACKS:
            _pin_to_loopback()
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
        where: dict[str, Any] = {}
        if host in _LOOPBACKS:
            _pin_to_loopback()
        else:
            log.warning(
                "the Ray head listens on %s: its metrics endpoints have no authentication", host
            )
            where["_node_ip_address"] = host
        ray.init(
            **{
                "include_dashboard": False,
                "log_to_driver": False,
                **head,
                **where,
                "address": "local",  # a new head, never a cluster some other process started
                "namespace": namespace,
                "resources": resources or None,  # e.g. {"NPU": 1} for emulated NPUs here
            }
        )
    else:
        ray.init(address=address, namespace=namespace, log_to_driver=False)


def _pin_to_loopback() -> None:
    os.environ[_RAY_CLUSTER_SWITCH] = "0"
    try:  # a Ray imported already read the variable: set what it read
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
    except (ImportError, AttributeError):  # another Ray version: the variable is enough
        pass


def _refresh_ray_config() -> None:
    """Make an already imported Ray see RAY_AUTH_MODE (Ray reads it once, on import)."""
    try:
        from ray._raylet import Config  # Ray's private config; absent in some versions

        Config.initialize("")
    except (ImportError, AttributeError, TypeError):  # other Ray versions: env read at init
        pass
