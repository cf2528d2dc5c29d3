"""A library's own operators in a program: the driver names the modules that define them and
a worker imports those before it loads (backends/library_ops.py)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import torch

from hetero.backends.library_ops import defining_modules


def _graph_calling(op) -> torch.fx.Graph:
    g = torch.fx.Graph()
    x, w, offs = g.placeholder("x"), g.placeholder("w"), g.placeholder("offs")
    g.output(g.call_function(op, (x, w, offs)))
    return g


def test_transformers_moe_operator_is_traced_to_its_module_and_a_fresh_process_gets_it():
    importlib.import_module("transformers.integrations.moe")  # registers the operator

    graph = _graph_calling(torch.ops.transformers.grouped_mm_fallback.default)
    modules = defining_modules(graph)
    assert modules == ("transformers.integrations.moe",)
    # what a Ray worker that never imported transformers does before loading its stages
    check = (
        "import torch, sys\n"
        "from hetero.backends.library_ops import import_all\n"
        "assert not hasattr(torch.ops.transformers, 'grouped_mm_fallback')\n"
        f"import_all({modules!r})\n"
        "print(torch.ops.transformers.grouped_mm_fallback.default._schema.name)\n"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "transformers::grouped_mm_fallback"


def test_torchs_own_operators_need_no_import():
    assert defining_modules(_graph_calling(torch.ops.aten.addmm.default)) == ()
