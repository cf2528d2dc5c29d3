"""The activation of an MLP block as a captured graph spells it: the one rule by which the
planner (partitioner/gpu_cpu_split.py, on an OpGraph) and the runtime
(runtime/split_linear.py, on the program's fx nodes) decide that `hetero::gpu_cpu_mlp`
can compute a block's activation itself. The two must fuse exactly the same blocks: the
planner prices the hand-offs the runtime makes.

An activation is its own op (silu, gelu, relu), SiLU decomposed as x * sigmoid(x), or
either computed in float32 between casts of a 16-bit value: core ATen's decompositions
upcast low-precision elementwise math, so a float16 or bfloat16 LLaMA's MLP reads

    _to_copy(gate, dtype=float32) -> x * sigmoid(x) -> _to_copy(.., dtype=float16) -> * up

and without seeing through the casts its gate/up and down split apart (two hand-offs where
one does). gpu_cpu_mlp then computes the activation of its 16-bit values in float32 and
rounds once, as the casts do (backends/gpu_cpu_mm.py `mlp_share`).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

from hetero.partitioner.host_dtype import SIXTEEN_BIT

V = TypeVar("V")

# op target -> the name gpu_cpu_mlp takes (backends/gpu_cpu_mm.py ACTIVATIONS; a tanh GELU
# is "gelu_tanh")
ACTIVATIONS = {
    "aten.silu.default": "silu",
    "aten.gelu.default": "gelu",
    "aten.relu.default": "relu",
}
MUL = "aten.mul.Tensor"
SIGMOID = "aten.sigmoid.default"
CAST = "aten._to_copy.default"


class Values(Protocol[V]):
    """A graph's values as the rule reads them (an fx node, an OpGraph value name)."""

    def target(self, v: V) -> str | None:
        """The op computing `v` ("aten.silu.default"); None for an input."""

    def tensors(self, v: V) -> tuple[V, ...]:
        """The tensors `v`'s op reads, in order."""

    def dtype(self, v: V) -> str:
        """`v`'s dtype ("float16")."""

    def unview(self, v: V) -> V:
        """The value a chain of views ending in `v` reads (`v` itself if it is no view)."""

    def kwarg(self, v: V, key: str) -> object:
        """An argument `v`'s op was given by name; None where the graph does not keep them
        (an OpGraph: the planner needs to know that a block fuses, not which activation)."""


def activation(g: Values[V], v: V) -> tuple[str, V] | None:
    """(the activation's name, the value it reads) when `v` is one of the activations
    gpu_cpu_mlp takes, computed in `v`'s dtype or in float32 between casts of a 16-bit
    value (then the value it reads is the 16-bit one, before its cast up), else None."""
    got = _computed(g, v)
    if got is not None or g.target(v) != CAST or g.dtype(v) not in SIXTEEN_BIT:
        return got
    args = g.tensors(v)  # the cast down; then the activation, and the cast up it reads
    got = _computed(g, g.unview(args[0])) if len(args) == 1 else None
    if got is None or g.dtype(args[0]) != "float32":
        return None
    name, wide = got
    wide = g.unview(wide)
    if g.target(wide) != CAST or len(g.tensors(wide)) != 1:
        return None
    (x,) = g.tensors(wide)
    return (name, x) if g.dtype(wide) == "float32" and g.dtype(x) == g.dtype(v) else None


def _computed(g: Values[V], v: V) -> tuple[str, V] | None:
    """(name, input) when `v` is an activation's own op or SiLU as x * sigmoid(x)."""
    target = g.target(v)
    args = g.tensors(v) if target is not None else ()
    if target in ACTIVATIONS and args:
        name = ACTIVATIONS[target]
        if name == "gelu" and g.kwarg(v, "approximate") == "tanh":
            name = "gelu_tanh"
        return name, args[0]
    if target == MUL and len(args) == 2:
        a, b = args
        for x, s in ((a, b), (b, a)):
            if g.target(s) == SIGMOID and g.tensors(s) == (x,):
                return "silu", x
    return None
