"""A backend that fails on purpose, for fault and verify tests (and chaos drills).

`FaultyBackend` is the eager backend plus two switches:
- at run time, a stage raises `InjectedFault` when its first input's first element equals
  `POISON` (so one request fails and the next one, with other data, succeeds);
- at compile time, `CompileOptions(extra=(("miscompile", "<op>"),))` (`FaultyOptions`) scales the output of
  every node whose target's name contains `<op>` by 1.5, the way a buggy kernel would.
It lives in the package (not in tests/) so Ray workers can import it by name.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.backends.base import Artifact, CompileOptions, CompileUnit, Manifest, Runner
from hetero.backends.eager import EagerBackend, EagerOptions
from hetero.cluster.spec import DeviceSpec

POISON = 1234.5


class InjectedFault(RuntimeError):
    """Raised by a FaultyBackend stage on a poisoned input."""


@dataclass(frozen=True)
class FaultyOptions(EagerOptions):
    miscompile: str = ""  # scale the output of every node whose target contains this by 1.5


class FaultyBackend(EagerBackend):
    name = "faulty"
    options_type = FaultyOptions

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        op = self.parse_options(options).miscompile
        if op:
            unit = _miscompiled(unit, str(op))
        manifest = super().compile(unit, device, options, out_dir)
        return Manifest(**{**manifest.__dict__, "backend": self.name})

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        run = super().load(artifact, device)

        def faulty(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            first = acts[0] if acts else None
            if (
                isinstance(first, torch.Tensor)
                and first.numel()
                and first.is_floating_point()
                and float(first.flatten()[0]) == POISON
            ):
                raise InjectedFault(f"injected fault in {artifact.key} (input[0][0] == {POISON})")
            return run(*acts)

        return faulty


def _miscompiled(unit: CompileUnit, op: str) -> CompileUnit:
    gm = copy.deepcopy(unit.module)
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and op in str(node.target):
            with gm.graph.inserting_after(node):
                wrong = gm.graph.call_function(torch.ops.aten.mul.Tensor, (node, 1.5))
            node.replace_all_uses_with(wrong, delete_user_cb=lambda u, w=wrong: u is not w)
    gm.recompile()
    return CompileUnit(
        name=unit.name,
        module=gm,
        inputs=unit.inputs,
        params=unit.params,
        outputs=unit.outputs,
        example_inputs=unit.example_inputs,
        param_values=unit.param_values,
        dynamic_dims=unit.dynamic_dims,
    )


def poisoned(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` that makes a FaultyBackend stage reading it raise."""
    y = x.clone()
    y.view(-1)[0] = POISON
    return y


EXTRA_BACKENDS = (("faulty", FaultyBackend),)
