"""Render a FusionPlan as one readable Python program: Triton kernels, launchers, `forward`.

Kernels with the same source (the same group in every layer) are emitted once. Launchers
carry their tile configuration as a module constant, so the autotuner's choice is part of
the file a person reads. `forward` launches the steps in order, calls ATen for the ops
outside every pattern, and drops each value after its last use.
"""

from __future__ import annotations

import hashlib
import math
import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch
from torch.fx import Node

from hetero.backends.triton.fusion import FusionPlan, Group, numel, shape, val
from hetero.backends.triton.kernels import (
    attention,
    conv,
    decode,
    elementwise,
    matmul_epilogue,
    norm,
    rotary,
)
from hetero.backends.triton.kernels.templates import PRELUDE

Template = Callable[[Group, str, dict], tuple[str, str, list]]
TEMPLATES: dict[str, Template] = {
    "pointwise": elementwise.render,
    "rowwise": norm.render,
    "matmul": matmul_epilogue.render,
    "gated": matmul_epilogue.render,
    "attention": attention.render,
    "decode": decode.render,
    "rotary": rotary.render,
    "conv": conv.render,
}


@dataclass(frozen=True)
class Kernel:
    """One generated kernel: its name, the kind of group, and a key for tuning."""

    name: str
    kind: str
    key: str  # hash of the kernel's source and shapes: the autotuning cache key
    uses: int  # how many steps launch it
    flops: int = 0  # per launch: the matrix work (2 per multiply-add)
    bytes: int = 0  # per launch: each input read once, each output written once
    space: tuple[int, ...] = ()  # the group's iteration space (tile choices depend on it)


@dataclass(frozen=True)
class Program:
    source: str
    kernels: tuple[Kernel, ...]
    inputs: tuple[str, ...]
    weights: tuple[str, ...]


def default_cfg(group: Group, interpret: bool, channels_last: frozenset[str] = frozenset()) -> dict:
    if group.kind in ("matmul", "gated"):
        _, m, n = group.space
        return matmul_epilogue.default_cfg(m, n, 0, interpret)
    if group.kind == "decode":
        b, _, _, n = group.space
        a = attention.sdpa(group.anchor)
        return decode.default_cfg(b * a.hk, n, interpret)
    if group.kind == "rotary":
        return rotary.default_cfg(interpret)
    if group.kind == "conv":
        w = group.anchor.args[1]
        return conv.default_cfg(interpret, isinstance(w, Node) and w.name in channels_last)
    if group.kind == "rowwise":
        return norm.default_cfg(group.space[1], interpret)
    if group.kind == "attention":
        return attention.default_cfg(interpret)
    return {"BLOCK": 1024 if not interpret else 256, "num_warps": 4}


def var(n: object) -> str:
    return f"v_{n.name}" if isinstance(n, Node) else repr(n)


def render_arg(a: object) -> str:
    """An fx argument as Python source inside `forward`."""
    if isinstance(a, Node):
        return var(a)
    if isinstance(a, list | tuple):
        inner = ", ".join(render_arg(x) for x in a)
        return f"[{inner}]" if isinstance(a, list) else f"({inner}{',' if len(a) == 1 else ''})"
    if isinstance(a, torch.dtype | torch.layout | torch.memory_format):
        return str(a)
    if isinstance(a, torch.device):
        return "dev"
    if isinstance(a, float) and not math.isfinite(a):
        return f"float('{a}')"
    if isinstance(a, str | int | float | bool) or a is None:
        return repr(a)
    raise TypeError(f"cannot render argument {a!r} of type {type(a).__name__}")


def _aten_call(node: Node) -> str:
    if node.target is operator.getitem:
        return f"{var(node.args[0])}[{node.args[1]!r}]"
    t = node.target
    name = None
    if hasattr(t, "_schema"):  # an OpOverload: aten's, or a library's own (transformers' MoE)
        ns = getattr(t, "namespace", "aten")
        name = f"aten.{t.__name__}" if ns == "aten" else f"torch.ops.{ns}.{t.__name__}"
    if name is None:
        raise TypeError(f"node {node.name}: cannot call {t!r} from generated code")
    args = [render_arg(a) for a in node.args]
    args += [f"{k}={render_arg(v)}" for k, v in node.kwargs.items()]
    return f"{name}({', '.join(args)})"


def generate(plan: FusionPlan, weights: tuple[str, ...], interpret: bool,
             tuned: Mapping[str, dict] | None = None,
             channels_last: frozenset[str] = frozenset()) -> Program:  # fmt: skip
    """The program's source. `tuned`: kernel key -> config chosen by the autotuner;
    `channels_last`: the weights `load` lays out channels-last (their convolutions then
    take channels-last inputs)."""
    tuned = tuned or {}
    gm = plan.module
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    inputs = tuple(p.name for p in phs[: len(phs) - len(weights)])
    out_node = next(n for n in gm.graph.nodes if n.op == "output")

    bodies: dict[str, str] = {}  # kernel+launcher source (without name) -> name
    kernels: dict[str, Kernel] = {}
    chunks: list[str] = []
    lines: list[str] = []
    last_use: dict[Node, int] = {}
    for i, step in enumerate(plan.steps):
        for node in step.nodes:
            for a in node.all_input_nodes:
                last_use[a] = i
    for a in out_node.all_input_nodes:
        last_use[a] = len(plan.steps)

    defined: set[Node] = set()
    for i, step in enumerate(plan.steps):
        if step.kind == "aten":
            node = step.anchor
            lines.append(f"{var(node)} = {_aten_call(node)}")
        else:
            probe_k, probe_l, _ = TEMPLATES[step.kind](step, "KNAME", {})
            text = probe_k + probe_l
            key = hashlib.sha256(text.encode()).hexdigest()[:16]
            if text not in bodies:
                kname = f"{step.kind}_{len(bodies)}"
                bodies[text] = kname
                cfg = tuned.get(key) or default_cfg(step, interpret, channels_last)
                kern, launch, _ = TEMPLATES[step.kind](step, kname, cfg)
                chunks.append(kern + "\n\n" + launch)
                _, _, values = TEMPLATES[step.kind](step, kname, {})
                kernels[kname] = Kernel(kname, step.kind, key, 0, step_flops(step),
                                        step_bytes(values, step.outputs), step.space)  # fmt: skip
            kname = bodies[text]
            k = kernels[kname]
            kernels[kname] = replace(k, uses=k.uses + 1)
            _, _, values = TEMPLATES[step.kind](step, kname, {})
            outs = ", ".join(var(o) for o in step.outputs)
            nodes = ", ".join(n.name for n in step.nodes)
            lines.append(f"# {step.rule}: {nodes}")
            lines.append(f"({outs},) = launch_{kname}({', '.join(var(v) for v in values)})")
        defined.update(step.outputs)
        dead = [
            var(n)
            for n in dict.fromkeys(a for s in step.nodes for a in s.all_input_nodes)
            if last_use.get(n) == i and n in defined
        ]
        dead += [var(n) for n in step.outputs if n not in last_use]
        if dead:
            lines.append(f"del {', '.join(dead)}")

    outs = out_node.args[0]
    ret = render_arg(tuple(outs) if isinstance(outs, list | tuple) else (outs,))
    params = ", ".join(var(p) for p in phs)
    fwd = (
        f"def forward({params}):\n"
        f"    dev = {var(phs[0]) if phs else 'None'}.device\n"
        + "\n".join("    " + ln for ln in lines)
        + f"\n    return {ret}\n"
    )
    source = PRELUDE + "\n" + "\n\n".join(chunks) + "\n\n" + fwd
    return Program(source, tuple(kernels.values()), inputs, weights)


def step_flops(step: Group) -> int:
    if step.kind in ("matmul", "gated"):
        a = step.anchor.args[1] if len(step.anchor.args) == 3 else step.anchor.args[0]
        two = step.kind == "gated" and matmul_epilogue.partner(step) is not None
        return (2 if two else 1) * 2 * math.prod(step.space) * shape(a)[-1]
    if step.kind in ("attention", "decode"):
        node = step.anchor
        b, h, m, d = shape(node.args[0])
        n = shape(node.args[1])[2]
        causal = bool(node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal"))
        return 4 * b * h * m * n * d // (2 if causal else 1)
    return 0


def step_bytes(values: list, outputs: tuple[Node, ...]) -> int:
    total = 0
    for n in dict.fromkeys([*values, *outputs]):
        v = val(n)
        if isinstance(v, torch.Tensor):
            total += numel(n) * v.element_size()
    return total


__all__ = ["Kernel", "Program", "generate"]
