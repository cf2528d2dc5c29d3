"""Library operators a program calls, and the Python modules that define them.

A model may call an operator a library registers from Python (transformers' Mixtral calls
`transformers::grouped_mm_fallback` through `torch.library.custom_op`). A program that
calls it loads only in a process where that registration ran: a Ray worker that never
imported transformers cannot load it ("device workers did not start"). The driver names
the defining modules once from the captured graph; each worker imports them before it
loads its partitions.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable

import torch

try:  # where torch keeps `torch.library.custom_op` definitions (private, since torch 2.4)
    from torch._library.custom_ops import OPDEFS
except ImportError:  # another torch: no operator is traced to its module
    OPDEFS = {}

# torch's own namespaces: registered by `import torch`
_TORCH = frozenset(
    {"aten", "prims", "prim", "quantized", "_c10d_functional", "c10d", "higher_order"}
)


def defining_modules(graph: torch.fx.Graph) -> tuple[str, ...]:
    """The modules whose import registers the library operators `graph` calls (those
    defined with `torch.library.custom_op`; an operator defined otherwise is left out)."""
    found: dict[str, None] = {}
    for node in graph.nodes:
        ns = getattr(node.target, "namespace", None) if node.op == "call_function" else None
        if ns is None or ns in _TORCH:
            continue
        opdef = OPDEFS.get(node.target._schema.name)
        module = getattr(getattr(opdef, "_init_fn", None), "__module__", None)
        if module and module != "__main__":
            found[module] = None
    return tuple(found)


def import_all(modules: Iterable[str]) -> None:
    """Imports each module (registering its operators in this process)."""
    for module in modules:
        importlib.import_module(module)
