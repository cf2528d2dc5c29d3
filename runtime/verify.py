"""Run compiled stages and eager PyTorch side by side; on a mismatch, name the first
partition whose output diverges and, inside it, the first op.

Each stage is fed the eager reference of its inputs, so an error upstream never hides
or excuses one downstream. Inside the guilty partition the search bisects over its ops:
it compiles the partition cut after op k with the same backend and options, and asks
whether that prefix already diverges (log2(ops) compiles, assuming that once an op's
output is wrong, later ones stay wrong).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.backends.base import CompileUnit
from hetero.backends.eager import load_weights
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.errors import ConfigError
from hetero.partitioner.graph import OpGraph
from hetero.partitioner.split import Partition, flatten_inputs, param_values, split
from hetero.runtime.artifacts import build_artifact, load_runner
from hetero.runtime.stage import StageSpec


@dataclass(frozen=True)
class StageCheck:
    index: int
    device: str
    backend: str
    max_abs_err: float
    ok: bool
    worst_value: str = ""


@dataclass(frozen=True)
class Divergence:
    partition: int
    device: str
    backend: str
    op: str | None  # the first diverging op of the partition (None when not bisected)
    target: str = ""  # its ATen target
    source: str = ""  # the model source line that created it
    max_abs_err: float = 0.0


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    stages: tuple[StageCheck, ...]
    end_to_end_err: float
    divergence: Divergence | None = None

    def table(self) -> str:
        lines = [f"{'partition':<10} {'device':<22} {'backend':<8} {'max |err|':>11}  result"]
        for s in self.stages:
            lines.append(
                f"p{s.index:<9} {s.device:<22} {s.backend:<8} {s.max_abs_err:>11.3e}  "
                + ("ok" if s.ok else f"DIVERGES ({s.worst_value})")
            )
        lines.append(f"end to end max |err|: {self.end_to_end_err:.3e}")
        d = self.divergence
        if d is not None:
            where = f" at op {d.op} ({d.target})" if d.op else ""
            lines.append(
                f"first divergence: partition p{d.partition} on {d.device} ({d.backend}){where}"
            )
            if d.source:
                lines.append(f"  model source: {d.source}")
        return "\n".join(lines)


def verify(
    graph: OpGraph,
    stages: Sequence[StageSpec],
    inputs: Sequence[Any] | Mapping[str, Any],
    *,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    registry: BackendRegistry | None = None,
    bisect_ops: bool = True,
    work_dir: str | Path | None = None,
) -> VerifyReport:
    """Compare every stage against eager on `inputs` (model args, or inputs by name)."""
    registry = registry or default_registry()
    parts = _partitions(graph, stages)
    params = param_values(graph)
    env: dict[str, Any] = dict(params)
    if isinstance(inputs, Mapping):
        env.update(inputs)
    else:
        env.update(flatten_inputs(graph, tuple(inputs)))
    user = {k: v for k, v in env.items() if k not in params}
    with torch.no_grad():
        for p in parts.values():
            env.update(zip(p.outputs, p(env), strict=True))
    checks: list[StageCheck] = []
    first: StageCheck | None = None
    chained: dict[str, Any] = dict(user)
    with torch.no_grad():
        for s in stages:
            run = _with_weights(load_runner(s.artifact, s.device, registry), s)
            got = run(*[env[n] for n in s.inputs])
            err, worst = _max_err(s.outputs, got, env, rtol, atol)
            ok = worst == ""
            check = StageCheck(s.index, s.device.name, s.backend, err, ok, worst)
            checks.append(check)
            if not ok and first is None:
                first = check
            chained.update(zip(s.outputs, run(*[chained[n] for n in s.inputs]), strict=True))
    outs = [o for o in graph.outputs if o]
    e2e, _ = _max_err(outs, [chained[o] for o in outs], env, rtol, atol)
    divergence = None
    if first is not None:
        stage = next(s for s in stages if s.index == first.index)
        op = target = source = None
        if bisect_ops:
            op = _bisect(
                graph, stage, parts[stage.index], env, params, registry, rtol, atol, work_dir
            )
            if op is not None and op in graph.nodes:
                node = graph[op]
                target, source = str(node.target), node.source_line
        divergence = Divergence(
            stage.index,
            stage.device.name,
            stage.backend,
            op,
            target or "",
            source or "",
            first.max_abs_err,
        )
    return VerifyReport(first is None, tuple(checks), e2e, divergence)


def _partitions(graph: OpGraph, stages: Sequence[StageSpec]) -> dict[int, Partition]:
    missing = [s.name for s in stages if not s.nodes]
    if missing:
        raise ConfigError(
            f"stages {missing} do not list their ops (StageSpec.nodes); build stages with "
            "hetero.runtime.build so verify can re-split the graph"
        )
    assignment = {n: s.index for s in stages for n in s.nodes}
    by_first = {s.nodes[0]: s.index for s in stages}
    out: dict[int, Partition] = {}
    for p in split(graph, assignment):
        out[by_first.get(p.nodes[0], assignment[p.nodes[0]])] = p
    return out


def _close(a: Any, b: Any, rtol: float, atol: float) -> tuple[bool, float]:
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        if len(a) != len(b):
            return False, float("inf")
        pairs = [_close(x, y, rtol, atol) for x, y in zip(a, b, strict=True)]
        return all(ok for ok, _ in pairs), max((e for _, e in pairs), default=0.0)
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        same = bool(a == b)
        return same, 0.0 if same else float("inf")
    if a.shape != b.shape:
        return False, float("inf")
    if not a.is_floating_point():
        same = torch.equal(a.cpu(), b.cpu())
        return same, 0.0 if same else float("inf")
    a32, b32 = a.detach().float().cpu(), b.detach().float().cpu()
    err = float((a32 - b32).abs().max()) if a32.numel() else 0.0
    return bool(torch.allclose(a32, b32, rtol=rtol, atol=atol, equal_nan=True)), err


def _max_err(
    names: Sequence[str], got: Sequence[Any], ref: Mapping[str, Any], rtol: float, atol: float
) -> tuple[float, str]:
    worst, bad = 0.0, ""
    for name, value in zip(names, got, strict=True):
        ok, err = _close(value, ref[name], rtol, atol)
        worst = max(worst, err)
        if not ok and not bad:
            bad = name
    return worst, bad


def _bisect(
    graph: OpGraph,
    stage: StageSpec,
    part: Partition,
    env: Mapping[str, Any],
    params: Mapping[str, torch.Tensor],
    registry: BackendRegistry,
    rtol: float,
    atol: float,
    work_dir: str | Path | None,
) -> str | None:
    unit = CompileUnit.from_partition(part, env, params)
    gm = unit.module
    ref = _node_values(gm, [env[n] for n in unit.inputs] + [params[p] for p in unit.params])
    candidates = [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_function" and isinstance(ref.get(n.name), torch.Tensor)
    ]
    if not candidates:
        return None
    backend = registry.get(stage.backend)
    root = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="hetero-verify-"))

    def diverges(name: str) -> bool:
        prefix = CompileUnit(
            name=f"{unit.name}_upto_{name}",
            module=_prefix(gm, name),
            inputs=unit.inputs,
            params=unit.params,
            outputs=(name,),
            example_inputs=unit.example_inputs,
            param_values=unit.param_values,
        )
        art = build_artifact(backend, prefix, stage.device, stage.options, root)
        (got,) = _with_weights(load_runner(art, stage.device, registry), stage, art)(
            *unit.example_inputs
        )
        ok, _ = _close(got, ref[name], rtol, atol)
        return not ok

    lo, hi = 0, len(candidates) - 1
    if not diverges(candidates[hi]):
        return None  # only a non-tensor output or the whole partition's fusion diverges
    while lo < hi:
        mid = (lo + hi) // 2
        if diverges(candidates[mid]):
            hi = mid
        else:
            lo = mid + 1
    return candidates[lo]


def _node_values(gm: torch.fx.GraphModule, args: Sequence[Any]) -> dict[str, Any]:
    values: dict[str, Any] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, n: torch.fx.Node) -> Any:
            out = super().run_node(n)
            values[n.name] = out
            return out

    with torch.no_grad():
        Recorder(gm).run(*args)
    return values


def _prefix(gm: torch.fx.GraphModule, last: str) -> torch.fx.GraphModule:
    """The partition's graph up to and including node `last`, returning its value."""
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            break
        env[n] = graph.node_copy(n, lambda x: env[x])
        if n.name == last:
            graph.output((env[n],))
            break
    return torch.fx.GraphModule(gm, graph)


def _with_weights(run, stage, artifact=None):
    """A streamed stage's runner takes its weights after the activations (host copies here)."""
    if getattr(stage, "weights", "resident") != "streamed":
        return run

    weights = list(load_weights(artifact or stage.artifact).values())

    def call(*acts):
        return run(*acts, *weights)

    return call
