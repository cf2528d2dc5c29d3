"""A partition's program without tracing it again: its GraphModule, cut from the captured
program, wrapped as the ExportedProgram that torch.export would make of it.

A partition's graph is already core ATen with a fake value on every node (the capture's), so
exporting it once more (`torch.export.export` of a module that calls it) only re-derives
what the graph holds: the same ops, in-place state writes kept (training IR), the same
shapes. That re-trace was the costliest step of a generation's build on the CPU (0.7 s of
a tiny LLaMA's prefill, every phase and piece once more). Where the graph is not as captured
(a rewrite added nodes without values, the weights were retyped, the piece moved to another
device, an input is a tuple or a size), `lifted_program` answers None and the caller
exports as before.
"""

from __future__ import annotations

from collections.abc import Sequence

import sympy
import torch
from torch._export.verifier import TrainingIRVerifier
from torch._subclasses.fake_tensor import FakeTensor
from torch.export import ExportedProgram
from torch.export.exported_program import ModuleCallEntry, ModuleCallSignature
from torch.export.graph_signature import (
    ExportGraphSignature,
    InputKind,
    InputSpec,
    OutputKind,
    OutputSpec,
    SymIntArgument,
    TensorArgument,
)
from torch.fx import Graph, GraphModule, Node
from torch.utils import _pytree as pytree


def lifted_program(gm: GraphModule, args: Sequence[object]) -> ExportedProgram | None:
    """`gm` called with `args` (tensors and sizes: activations, then weights) as the
    training-IR ExportedProgram `torch.export.export` makes of it, its graph a copy of `gm`'s
    (the node values are the capture's, shared); None where `gm` is not as captured for
    these `args` (then export it)."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(args):
        return None
    if not all(_matches(n.meta.get("val"), a) for n, a in zip(placeholders, args, strict=True)):
        return None
    for node in gm.graph.nodes:
        # a node a rewrite added holds no value; a get_attr is a tensor export would lift
        if node.op == "get_attr" or (node.op == "call_function" and "val" not in node.meta):
            return None
    out = next(n for n in gm.graph.nodes if n.op == "output")
    results = out.args[0]
    if not isinstance(results, tuple | list) or not all(
        isinstance(r, Node) and isinstance(r.meta.get("val"), FakeTensor) for r in results
    ):
        return None
    graph = Graph()
    copied = graph.graph_copy(gm.graph, {})
    graph.output(copied)
    graph.eliminate_dead_code()  # what export drops: a value computed and never used
    module = GraphModule(gm, graph)
    inputs = [_argument(n) for n in graph.nodes if n.op == "placeholder"]
    outs = [n.name for n in next(n for n in graph.nodes if n.op == "output").args[0]]
    signature = ExportGraphSignature(
        input_specs=[InputSpec(InputKind.USER_INPUT, a, None) for a in inputs],
        output_specs=[OutputSpec(OutputKind.USER_OUTPUT, TensorArgument(n), None) for n in outs],
    )
    call = ModuleCallSignature(
        inputs=[],
        outputs=[],
        in_spec=pytree.tree_flatten((tuple(args), {}))[1],
        out_spec=pytree.tree_flatten(tuple(results))[1],
    )
    return ExportedProgram(
        root=module,
        graph=module.graph,
        graph_signature=signature,
        state_dict={},
        range_constraints=_ranges(placeholders),
        module_call_graph=[ModuleCallEntry("", call)],
        example_inputs=(tuple(args), {}),
        constants={},
        verifiers=[TrainingIRVerifier],
    )


def _argument(node: Node) -> TensorArgument | SymIntArgument:
    if isinstance(node.meta["val"], torch.SymInt):
        return SymIntArgument(node.name)
    return TensorArgument(node.name)


def _matches(val: object, arg: object) -> bool:
    """The capture's value of an input says what `arg` is: its dtype, device and rank, and
    every size that is not symbolic; a size computed upstream (an int here) is one symbol,
    as export makes of an int input it keeps dynamic."""
    if isinstance(val, torch.SymInt):
        return isinstance(arg, int) and isinstance(val.node.expr, sympy.Symbol)
    if not isinstance(val, FakeTensor) or not isinstance(arg, torch.Tensor):
        return False
    if (val.dtype, val.device, val.dim()) != (arg.dtype, arg.device, arg.dim()):
        return False
    return all(not isinstance(v, int) or v == a for v, a in zip(val.shape, arg.shape, strict=True))


def _ranges(placeholders: Sequence[Node]) -> dict:
    """The capture's value range of every symbol in the inputs' shapes and sizes (a prompt's
    length)."""
    out = {}
    for node in placeholders:
        val = node.meta["val"]
        for size in (val,) if isinstance(val, torch.SymInt) else val.shape:
            if isinstance(size, torch.SymInt):
                env = size.node.shape_env
                for sym in size.node.expr.free_symbols:
                    out[sym] = env.var_to_range[sym]
    return out


__all__ = ["lifted_program"]
