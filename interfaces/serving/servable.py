"""What the server serves: a compiled model, one still compiling, or a Ray actor.

A servable has `input_metas` / `output_metas` (name -> TensorMeta), `run_flat(named
tensors) -> named tensors`, `ready()` (every partition answers), `info()` (model name,
plan summary, partitions, state), `contract` (what a request may hold:
interfaces/validation.py), `accepts()` (whether a request may wait while it is not ready:
it is recovering, not loading) and `shutdown()`. Only the first three are required; the
server reads the rest with defaults, so a test's fake can be a few lines.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from hetero.errors import HeteroError, InvalidInput, Unavailable
from hetero.interfaces.validation import Contract
from hetero.partitioner.graph import TensorMeta

_UNKNOWN = TensorMeta((), (), "other")


class NotReady(Unavailable):
    """The model is still loading, or failed to load (the message says which and why)."""


def servable_contract(servable: Any) -> Contract:
    """The servable's contract, or one made of its input metas (names, dtypes, shapes)."""
    contract = getattr(servable, "contract", None)
    if isinstance(contract, Contract):
        return contract
    return Contract.from_metas(servable.input_metas)


@runtime_checkable
class Servable(Protocol):
    input_metas: Mapping[str, TensorMeta]
    output_metas: Mapping[str, TensorMeta]

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def ready(self) -> bool: ...


def plan_info(plan: Any) -> dict[str, Any]:
    """Plan summary and partition rows for ModelInfo (tolerates a plan without explain)."""
    if plan is None:
        return {"plan_summary": "", "partitions": []}
    try:
        summary = plan.explain()
    except Exception as e:  # explain is for people; its failure must not break serving
        summary = f"(plan summary unavailable: {e})"
    rows = [
        {
            "index": p.index,
            "device": p.device,
            "backend": p.backend,
            "ops": len(p.nodes),
            "predicted_ms": float(p.predicted_ms),
            "emulated": bool(getattr(p, "emulated", False)),
        }
        for p in getattr(plan, "partitions", ())
    ]
    return {"plan_summary": summary, "partitions": rows}


def graph_metas(cm: Any) -> tuple[dict[str, TensorMeta], dict[str, TensorMeta]]:
    """Input and output metas of a CompiledModel, in the order of its names."""
    graph = cm.graph
    inputs = {n: graph.inputs[n] for n in cm.input_names}
    names = list(cm.output_names)
    values = list(getattr(graph, "outputs", ()))
    # Output names may be the graph's value names or positional ("output0", ...).
    if len(values) != len(names):
        values = names
    outputs: dict[str, TensorMeta] = {}
    for n, v in zip(names, values, strict=True):
        try:
            outputs[n] = graph.value_meta(v)
        except (KeyError, AttributeError):
            outputs[n] = _UNKNOWN
    return inputs, outputs


class ModelServable:
    """A hetero CompiledModel (in this process) behind the server."""

    def __init__(self, cm: Any, name: str = "") -> None:
        self.cm = cm
        self.name = name or getattr(getattr(cm, "graph", None), "model_name", "model")
        self.input_metas, self.output_metas = graph_metas(cm)
        contract = getattr(cm, "contract", None)
        self.contract = (
            contract if isinstance(contract, Contract) else Contract.from_graph(cm.graph)
        )

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with torch.inference_mode():
            return dict(self.cm.run_flat(inputs))

    def ready(self) -> bool:
        return bool(self.cm.ready())

    def accepts(self) -> bool:
        probe = getattr(self.cm, "accepts", None)
        return bool(probe()) if callable(probe) else self.ready()

    def info(self) -> dict[str, Any]:
        state, why = self.cm.status() if hasattr(self.cm, "status") else ("ready", "")
        info = {"model": self.name, "state": state, **plan_info(self.cm.plan)}
        if why:
            info["error"] = why
        return info

    def shutdown(self) -> None:
        self.cm.shutdown()


class LoadingServable:
    """Builds the real servable in a background thread: live at once, ready when built.

    A build that raises (a partition that fails to compile, a worker that cannot load)
    leaves it live but never ready, with the error in `info()` and in Infer's answer.
    """

    def __init__(self, build: Callable[[], Any], name: str = "model") -> None:
        self.name = name
        self._build = build
        self._inner: Any = None
        self._error = ""
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._load, name=f"hetero-load-{name}", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        try:
            inner = self._build()
        except Exception as e:  # every failure is reported through health and info
            detail = str(e) if isinstance(e, HeteroError) else traceback.format_exc(limit=4)
            with self._lock:
                self._error = f"{type(e).__name__}: {detail}"
        else:
            with self._lock:
                self._inner = inner
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the build finished (True) or `timeout` passed (False)."""
        return self._done.wait(timeout)

    @property
    def state(self) -> str:
        if not self._done.is_set():
            return "loading"
        return "failed" if self._error else "ready"

    @property
    def error(self) -> str:
        return self._error

    @property
    def inner(self) -> Any:
        return self._inner

    @property
    def input_metas(self) -> Mapping[str, TensorMeta]:
        return self._inner.input_metas if self._inner is not None else {}

    @property
    def output_metas(self) -> Mapping[str, TensorMeta]:
        return self._inner.output_metas if self._inner is not None else {}

    @property
    def contract(self) -> Contract:
        return servable_contract(self._inner) if self._inner is not None else Contract(())

    def accepts(self) -> bool:
        probe = getattr(self._inner, "accepts", None)
        return bool(probe()) if callable(probe) else False

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._inner is None:
            if self._error:
                raise NotReady(f"{self.name} failed to load and serves nothing: {self._error}")
            raise NotReady(f"{self.name} is still loading; retry when health says SERVING")
        return self._inner.run_flat(inputs)

    def ready(self) -> bool:
        return self._inner is not None and bool(self._inner.ready())

    def info(self) -> dict[str, Any]:
        if self._inner is None:
            return {"model": self.name, "state": self.state, "error": self._error}
        info = dict(getattr(self._inner, "info", dict)())
        info.setdefault("model", self.name)
        if not self.ready() and info.get("state", "ready") == "ready":
            info["state"] = "not-ready"
        return info

    def shutdown(self) -> None:
        # A build still running is left to finish in its daemon thread.
        if self._inner is not None and hasattr(self._inner, "shutdown"):
            self._inner.shutdown()


class ActorServable:
    """A hetero deployment actor (see hetero.interfaces.deploy) behind a local gRPC server."""

    def __init__(self, handle: Any, timeout: float = 10.0) -> None:
        import ray  # optional (hetero[ray]): loaded on first use

        self._ray = ray
        self.handle = handle
        self.timeout = timeout
        self.input_metas, self.output_metas = ray.get(handle.metas.remote(), timeout=600)
        self.contract = ray.get(handle.contract.remote(), timeout=600)

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        from ray.exceptions import RayTaskError  # optional (hetero[ray]): actor deployments only

        try:
            return self._ray.get(self.handle.run_flat.remote(inputs))
        except RayTaskError as e:
            # The caller's own mistake, or a deployment that cannot serve now, is reported
            # as such, not as a failure of the actor.
            cause = getattr(e, "cause", None)
            if isinstance(cause, InvalidInput | Unavailable):
                raise cause from None
            raise

    def ready(self) -> bool:
        return self._ask("ready")

    def accepts(self) -> bool:
        return self._ask("accepts")

    def _ask(self, method: str) -> bool:
        try:
            return bool(self._ray.get(getattr(self.handle, method).remote(), timeout=self.timeout))
        except Exception:  # an actor that died or hangs is simply not ready
            return False

    def info(self) -> dict[str, Any]:
        return self._ray.get(self.handle.info.remote(), timeout=self.timeout)

    def shutdown(self) -> None:
        pass  # the actor belongs to whoever deployed it (hetero stop ends it)
