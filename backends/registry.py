"""One registry of backends by name: the built-ins plus the `hetero.backends` entry points.

Registration is explicit; a duplicate name is an error and an unknown name lists the
known ones, the way TVM's registries answer. One registry object travels from the edge
(`hetero.plan`, `hetero.compile`) through planning and compiling to the runtime's workers,
so a backend registered on it is found everywhere; it pickles (its factories name their
classes; loaded backends stay behind).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

from hetero.backends.base import Backend, CompileOptions
from hetero.cluster.schema import did_you_mean
from hetero.errors import ConfigError
from hetero.partitioner.decisions import BackendAssignment

ENTRY_POINT_GROUP = "hetero.backends"

# name -> "module:Class"; imported on first use so that `hetero plan` never pays for TVM/Triton.
BUILTIN: dict[str, str] = {
    "eager": "hetero.backends.eager:EagerBackend",
    "tvm": "hetero.backends.tvm:TVMBackend",
    "triton": "hetero.backends.triton:TritonBackend",
    "inductor": "hetero.backends.inductor:InductorBackend",
    "cudagraphs": "hetero.backends.cudagraphs:CudaGraphsBackend",
    "inductor-cudagraphs": "hetero.backends.inductor:InductorGraphsBackend",
}


class BackendRegistry:
    def __init__(self) -> None:
        self._factories: dict[str, Callable[[], Backend]] = {}
        self._instances: dict[str, Backend] = {}

    def register(self, name: str, factory: Callable[[], Backend]) -> None:
        if name in self._factories:
            raise ConfigError(f"a backend named {name!r} is already registered")
        self._factories[name] = factory

    def names(self) -> list[str]:
        return sorted(self._factories)

    def get(self, name: str) -> Backend:
        if name not in self._factories:
            raise ConfigError(
                f"no backend {name!r}{did_you_mean(name, self.names())}; "
                f"known: {', '.join(self.names())}"
            )
        if name not in self._instances:
            self._instances[name] = self._factories[name]()
        return self._instances[name]

    def __contains__(self, name: str) -> bool:
        return name in self._factories

    def __getstate__(self) -> dict[str, Any]:
        # loaded backends hold native state (TVM modules, CUDA contexts): a worker loads its own
        return {"_factories": self._factories, "_instances": {}}

    def check_options(self, options: CompileOptions) -> None:
        """Raise ConfigError, listing the known ones, for a backend-specific option no
        backend here declares (a typo would otherwise be ignored by every backend), and
        for a known one of the wrong type."""
        known: set[str] = set()
        for name in self.names():
            try:
                backend = self.get(name)
            except Exception:  # a plug-in that fails to import declares nothing
                continue
            known.update(backend.options_type.names())
            backend.parse_options(options)  # type-checks the knobs it declares
        unknown = sorted(k for k, _ in options.extra if k not in known)
        if unknown:
            raise ConfigError(
                f"no backend takes the option(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(known))}"
            )

    def check_assignment(
        self,
        backends: BackendAssignment,
        kinds: Iterable[str] | None = None,
        where: str = "backends",
    ) -> None:
        """A ConfigError on `<where>.<kind>` for a backend name this registry lacks (with the
        closest known name) and for a backend that does not compile for that kind of device
        (`cpu: triton`), listing the ones that do. `kinds`: the kinds to check (default:
        all the assignment names). A backend whose plug-in fails to import is left to the
        planner, which plans its partitions with eager and says why."""
        chosen = dict(backends.by_kind)
        for kind in chosen if kinds is None else kinds:
            name = chosen.get(kind)
            if name is None:
                continue
            if name not in self:
                raise ConfigError(
                    f"{where}.{kind}: no backend {name!r}{did_you_mean(name, self.names())}; "
                    f"known: {', '.join(self.names())}"
                )
            try:
                targets = self.get(name).device_kinds
            except Exception:  # a plug-in that fails to import: the planner says why
                continue
            if kind not in targets:
                fits = [n for n in self.names() if kind in self._kinds(n)]
                raise ConfigError(
                    f"{where}.{kind}: {name} compiles for {' and '.join(targets)} devices only; "
                    f"for {kind} use one of: {', '.join(fits)}"
                )

    def _kinds(self, name: str) -> tuple[str, ...]:
        try:
            return tuple(self.get(name).device_kinds)
        except Exception:  # a plug-in that fails to import targets nothing here
            return ()

    def for_kind(self, kind: str) -> list[str]:
        """Names of backends that target a device kind and whose libraries import here."""
        out = []
        for name in self.names():
            try:
                b = self.get(name)
            except Exception:  # a plug-in that fails to import is skipped, not fatal
                continue
            if kind in b.device_kinds and b.available():
                out.append(name)
        return out


@dataclass(frozen=True)
class _Lazy:
    """A factory that imports "module:Class" on first use (and pickles as that string)."""

    path: str

    def __call__(self) -> Backend:
        module, cls = self.path.split(":")
        return getattr(importlib.import_module(module), cls)()


def default_registry(extra: Iterable[tuple[str, Callable[[], Backend]]] = ()) -> BackendRegistry:
    """A fresh registry: built-ins, then entry points, then `extra`."""
    reg = BackendRegistry()
    for name, path in BUILTIN.items():
        reg.register(name, _Lazy(path))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in reg:
            reg.register(ep.name, _Lazy(f"{ep.module}:{ep.attr}"))
    for name, factory in extra:
        reg.register(name, factory)
    return reg
