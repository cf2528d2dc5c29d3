"""backends/lifted.py: a partition's streamed program wrapped from its captured graph is the
program torch.export makes of it (same signature, same values, saved and loaded), and a
graph that is not as captured for its inputs is left to torch.export."""

from __future__ import annotations

import operator

import torch
from block_units import Block, unit_of

from hetero.backends.eager import _ParamsAsInputs
from hetero.backends.export import runnable
from hetero.backends.lifted import lifted_program


def _unit_and_args():
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(3, 16)
    unit = unit_of(model, x)
    args = (*unit.example_inputs, *(unit.param_values[p] for p in unit.params))
    return model, x, unit, args


def _ops(ep: torch.export.ExportedProgram) -> list[str]:
    """The program's ops (export also keeps a getitem of each unused output of an op)."""
    calls = [n for n in ep.graph.nodes if n.op == "call_function"]
    return sorted(str(n.target) for n in calls if n.target is not operator.getitem)


def test_the_lifted_program_is_the_exported_one(tmp_path):
    model, x, unit, args = _unit_and_args()
    lifted = lifted_program(unit.module, args)
    assert lifted is not None
    with torch.no_grad():
        exported = torch.export.export(_ParamsAsInputs(unit.module).eval(), args, strict=False)
    kinds = [(s.kind, type(s.arg)) for s in exported.graph_signature.input_specs]
    assert [(s.kind, type(s.arg)) for s in lifted.graph_signature.input_specs] == kinds
    assert len(lifted.graph_signature.output_specs) == len(exported.graph_signature.output_specs)
    assert _ops(lifted) == _ops(exported)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(runnable(lifted)(*args)[0], want)
        torch.export.save(lifted, tmp_path / "p.pt2")
        loaded = torch.export.load(tmp_path / "p.pt2")
        torch.testing.assert_close(runnable(loaded)(*args)[0], want)
    # the unit's own graph is not the program's: changing one leaves the other
    assert lifted.graph_module.graph is not unit.module.graph


def test_inputs_the_capture_did_not_see_are_left_to_torch_export():
    _, _, unit, args = _unit_and_args()
    assert lifted_program(unit.module, args[:-1]) is None  # one input short
    assert lifted_program(unit.module, (args[0].double(), *args[1:])) is None  # another dtype
    assert lifted_program(unit.module, (args[0][:2], *args[1:])) is None  # another static size
    # a node a rewrite added, without the capture's value (on a copy: the unit's graph stays)
    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(unit.module.graph, {}))
    rewritten = torch.fx.GraphModule(unit.module, graph)
    next(n for n in graph.nodes if n.op == "call_function").meta.pop("val")
    assert lifted_program(rewritten, args) is None
    assert lifted_program(unit.module, args) is not None
