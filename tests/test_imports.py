"""The import graph of the package, read from the source (nothing is imported): no cycle
between modules, no layer importing one above it, and no import inside a function except
of an optional heavy dependency, with a comment saying so.

Layers, bottom to top (each may import the ones below it, never one above):

    hetero.errors, hetero.paths,   what every layer shares
    hetero.environment, hetero.compile_times
    cluster                        the cluster description: spec, devices, profiles
    partitioner                    capture -> OpGraph -> cost -> algorithms -> Plan
    backends                       compile and load a partition
    calibration                    measure devices through the backends -> profiles
    runtime                        run a plan's stages (in process or on Ray)
    interfaces                     the ways in: API, CLI, config, deploy, serving, jobs
    hetero (the package root)      the public names, loaded lazily
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass
from pathlib import Path

import networkx as nx
import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (
    ("hetero.errors", "hetero.paths", "hetero.environment", "hetero.compile_times"),
    ("hetero.cluster",),
    ("hetero.partitioner",),
    ("hetero.backends",),
    ("hetero.calibration",),
    ("hetero.runtime",),
    ("hetero.interfaces",),
    ("hetero",),
)
# Imported inside a function only: optional extras (pyproject's [project.optional-dependencies])
# and heavy libraries a command or a probe needs on first use.
OPTIONAL = frozenset(
    {"ray", "tvm", "triton", "transformers", "onnxruntime", "onnx", "matplotlib", "grpc",
     "grpc_health"}
)  # fmt: skip
# (module, imported module or its package) allowed inside a function for a reason of its own
ALLOWED_INSIDE = {
    # the cluster description imports without torch; only its CUDA probe needs torch
    ("hetero.cluster.discover", "torch"),
    # the gRPC server needs grpc (hetero[serve]); a deployment that never serves does not
    ("hetero.interfaces.deploy", "hetero.interfaces.serving.server"),
    # Inductor's compiler proper (0.9-1.3 s to import) for a warmed load only; every process
    # that loads the backend registry (a Ray worker running TVM) would pay it at the top
    ("hetero.backends.inductor", "torch._inductor.compile_fx"),
    # the same, for a generation stage's warmed compile only (runtime/stage_warming.py)
    ("hetero.runtime.stage_compile", "torch._inductor.compile_fx"),
    # Inductor's C++ builder, for the host kernel's first build only: the runtime imports
    # this module wherever it runs a generation, most of them never building it
    ("hetero.backends.cpu_gemv", "torch._inductor.codecache"),
}


def _allowed_inside(e: Edge) -> bool:
    if e.dst.split(".")[0] in OPTIONAL:
        return True
    return any(e.src == src and (e.dst + ".").startswith(dst + ".") for src, dst in ALLOWED_INSIDE)


@functools.cache
def package_dirs() -> dict[str, Path]:
    """hetero's subpackages and their folders, from pyproject's [tool.setuptools.package-dir]."""
    text = (ROOT / "pyproject.toml").read_text()
    table = text.split("[tool.setuptools.package-dir]", 1)[1].split("\n[", 1)[0]
    return {m: ROOT / d for m, d in re.findall(r'^"([\w.]+)"\s*=\s*"([^"]+)"', table, re.M)}


@functools.cache
def modules() -> dict[str, Path]:
    """Module name -> file, for every module of the package."""
    out: dict[str, Path] = {}
    for pkg, folder in package_dirs().items():
        for f in folder.rglob("*.py"):
            parts = list(f.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([pkg, *parts])] = f
    return out


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a module of the package, or an outside top-level name
    line: int
    inside_function: bool
    type_only: bool  # under `if TYPE_CHECKING:`
    commented: bool  # a comment on the import's line or the line above


@functools.cache
def edges() -> tuple[Edge, ...]:
    mods = modules()
    out = []
    for name, path in mods.items():
        source = path.read_text()
        lines = source.splitlines()
        tree = ast.parse(source)
        parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
        for node in ast.walk(tree):
            if not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            inside = type_only = False
            p = parents.get(node)
            while p is not None:
                inside |= isinstance(p, ast.FunctionDef | ast.AsyncFunctionDef)
                type_only |= isinstance(p, ast.If) and "TYPE_CHECKING" in ast.unparse(p.test)
                p = parents.get(p)
            text = lines[node.lineno - 1] + (lines[node.lineno - 2] if node.lineno > 1 else "")
            commented = "#" in text
            for target in _targets(name, path, node, mods):
                out.append(Edge(name, target, node.lineno, inside, type_only, commented))
    return tuple(out)


def _targets(name: str, path: Path, node: ast.AST, mods: dict[str, Path]) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ""
    if node.level:  # relative: from the module's package
        pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        pkg = pkg[: len(pkg) - node.level + 1]
        base = ".".join([*pkg, *([node.module] if node.module else [])])
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def layer(module: str) -> int | None:
    """The layer of `module`: that of the longest layer name it is, or is inside of."""
    hits = [
        (len(n), i)
        for i, names in enumerate(LAYERS)
        for n in names
        if module == n or module.startswith(n + ".")
    ]
    return max(hits)[1] if hits else None


def test_the_walk_sees_the_whole_package():
    mods = modules()
    assert {"hetero", "hetero.cluster.spec", "hetero.calibration.run"} <= set(mods)
    assert {"hetero.interfaces.cli", "hetero.backends.tvm.backend"} <= set(mods)
    assert all(layer(m) is not None for m in mods), [m for m in mods if layer(m) is None]


def test_no_import_cycles():
    mods = modules()
    g = nx.DiGraph()
    g.add_nodes_from(mods)
    g.add_edges_from((e.src, e.dst) for e in edges() if e.dst in mods and not e.type_only)
    cycles = [sorted(c) for c in nx.strongly_connected_components(g) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_no_layer_imports_one_above_it():
    mods = modules()
    bad = [
        f"{e.src}:{e.line} imports {e.dst}"
        for e in edges()
        if e.dst in mods and layer(e.src) < layer(e.dst)  # type: ignore[operator]
    ]
    assert not bad, "a lower layer imports a higher one:\n  " + "\n  ".join(bad)


def test_imports_inside_functions_are_optional_heavy_dependencies_with_a_reason():
    bad = [
        f"{e.src}:{e.line} imports {e.dst}" + ("" if e.commented else " (and says not why)")
        for e in edges()
        if e.inside_function and not (_allowed_inside(e) and e.commented)
    ]
    assert not bad, "imports inside functions:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("name", ["hetero.cluster.spec", "hetero.cluster.profile"])
def test_the_bottom_layer_imports_no_torch(name):
    mods = modules()
    seen, todo = set(), [name]
    while todo:
        m = todo.pop()
        if m in seen:
            continue
        seen.add(m)
        for e in edges():
            if e.src == m and not e.inside_function and not e.type_only:
                assert e.dst.split(".")[0] != "torch", f"{m}:{e.line} imports torch"
                if e.dst in mods:
                    todo.append(e.dst)
