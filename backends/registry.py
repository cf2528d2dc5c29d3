"""One registry of backends by name: the built-ins plus the `hetero.backends` entry points.

Registration is explicit; a duplicate name is an error and an unknown name lists the
known ones, the way TVM's registries answer.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from importlib.metadata import entry_points

from hetero.backends.base import Backend
from hetero.errors import ConfigError

ENTRY_POINT_GROUP = "hetero.backends"

# name -> "module:Class"; imported on first use so that `hetero plan` never pays for TVM/Triton.
BUILTIN: dict[str, str] = {
    "eager": "hetero.backends.eager:EagerBackend",
    "tvm": "hetero.backends.tvm:TVMBackend",
    "triton": "hetero.backends.triton:TritonBackend",
    "inductor": "hetero.backends.inductor:InductorBackend",
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
            raise ConfigError(f"no backend {name!r}; known: {', '.join(self.names())}")
        if name not in self._instances:
            self._instances[name] = self._factories[name]()
        return self._instances[name]

    def __contains__(self, name: str) -> bool:
        return name in self._factories

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


def _lazy(path: str) -> Callable[[], Backend]:
    def make() -> Backend:
        module, cls = path.split(":")
        return getattr(importlib.import_module(module), cls)()

    return make


def default_registry(extra: Iterable[tuple[str, Callable[[], Backend]]] = ()) -> BackendRegistry:
    """A fresh registry: built-ins, then entry points, then `extra`."""
    reg = BackendRegistry()
    for name, path in BUILTIN.items():
        reg.register(name, _lazy(path))
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        if ep.name not in reg:
            reg.register(ep.name, ep.load)
    for name, factory in extra:
        reg.register(name, factory)
    return reg
