"""How a compiled Ray graph fails, and bounded waits around everything that can hang.

Ray Compiled Graphs fail two ways. An exception in a stage's own code comes back from
`ray.get` as `RayTaskError(<cause>)`; the graph stays usable and the next request may
run. An actor death (`ActorDiedError`), a closed or timed-out channel (`RayChannelError`)
or a wait past its deadline leaves the graph unusable: it must be torn down and compiled
again over the (restarted) actors. NCCL send/recv have no timeout of their own, so the
caller's `ray.get` timeout is the only bound on a stuck GPU hop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from hetero.errors import HeteroError, WorkerError

log = logging.getLogger("hetero.runtime")


def user_error(e: BaseException) -> BaseException | None:
    """The stage's own exception if `e` is one (graph still usable), else None."""
    from ray.exceptions import RayError, RayTaskError  # optional (hetero[ray]): loaded on first use

    if isinstance(e, RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None and not isinstance(cause, RayError):
            return cause
        if cause is None and isinstance(e, HeteroError):
            return e
    return None


def is_fault(e: BaseException) -> bool:
    """A failure of the machinery (actor, node, channel, deadline), not of a stage's code."""
    from ray.exceptions import RayError  # optional (hetero[ray]): loaded on first use

    return user_error(e) is None and isinstance(e, RayError | TimeoutError)


def clean(cause: BaseException) -> WorkerError:
    """A WorkerError carrying the stage's message without Ray's remote traceback wrapper."""
    if isinstance(cause, WorkerError):
        return WorkerError(str(cause).strip())
    return WorkerError(f"a partition failed: {type(cause).__name__}: {cause}")


def bounded(fn: Callable[[], Any], timeout_s: float, what: str) -> bool:
    """Run `fn` in a daemon thread; give up waiting after `timeout_s`. True if it finished."""
    done = threading.Event()
    errors: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as e:  # reported below; a teardown failure must not escape
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=target, name=f"hetero-{what}", daemon=True).start()
    finished = done.wait(timeout_s)
    if not finished:
        log.warning("%s did not finish within %.1f s; continuing without it", what, timeout_s)
    elif errors:
        log.info("%s raised %s: %s (ignored)", what, type(errors[0]).__name__, errors[0])
    return finished


def wait_ready(
    workers: Mapping[str, Any], timeout_s: float
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    """Ask every worker `ready()`; (answers by device, reasons by device that did not).

    A restarting actor (ActorUnavailableError) is asked again until the deadline; a dead
    one (ActorDiedError: restarts spent, node gone) is reported at once.
    """
    import ray  # optional (hetero[ray]): loaded on first use

    # optional (hetero[ray]): loaded on first use
    from ray.exceptions import ActorUnavailableError, RayError

    deadline = time.monotonic() + timeout_s
    pending = {name: w.ready.remote() for name, w in workers.items()}
    ready: dict[str, dict[str, Any]] = {}
    lost: dict[str, str] = {}
    while pending:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        done, _ = ray.wait(list(pending.values()), num_returns=1, timeout=left)
        for ref in done:
            name = next(n for n, r in pending.items() if r == ref)
            try:
                ready[name] = ray.get(ref, timeout=max(left, 1.0))
                del pending[name]
            except ActorUnavailableError:
                time.sleep(min(0.2, max(0.0, deadline - time.monotonic())))
                pending[name] = workers[name].ready.remote()
            except RayError as e:
                del pending[name]
                lost[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    for name in pending:
        lost[name] = f"no answer within {timeout_s:g} s (restarting, or its node is gone)"
    return ready, lost
