"""A backend that fails on purpose, for fault and verify tests (and chaos drills).

`FaultyBackend` is the eager backend plus three switches:
- at run time, a stage raises `InjectedFault` when its first input's first element equals
  `POISON` (so one request fails and the next one, with other data, succeeds);
- at compile time, `CompileOptions(extra=(("miscompile", "<op>"),))` (`FaultyOptions`) scales the output of
  every node whose target's name contains `<op>` by 1.5, the way a buggy kernel would;
- `delay_ms` / `delay_after` (`FaultyOptions`): every call of a loaded partition after its
  first `delay_after` sleeps `delay_ms` more, the way a device slowed down under a running
  deployment (thermal throttling, a noisy neighbour) would: online re-planning's test.
It lives in the package (not in tests/) so Ray workers can import it by name.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.backends.base import (
    Artifact,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
    sha256_file,
)
from hetero.backends.eager import EagerBackend, EagerOptions
from hetero.cluster.spec import DeviceSpec
from hetero.runtime.retype import retype_unit

POISON = 1234.5
DELAY_FILE = "faulty.json"  # the delay a compiled partition sleeps (and its scale), beside it


class InjectedFault(RuntimeError):
    """Raised by a FaultyBackend stage on a poisoned input."""


@dataclass(frozen=True)
class FaultyOptions(EagerOptions):
    miscompile: str = ""  # scale the output of every node whose target contains this by 1.5
    delay_ms: float = 0.0  # every call sleeps this long more ...
    delay_after: int = 0  # ... after this many calls of the loaded partition
    # its 16-bit work done in float32, outputs cast back (as a kernel that keeps float32
    # between fused ops): nearer the exact values than the 16-bit eager run
    float32: bool = False
    scale: float = 1.0  # every floating output multiplied by this (a subtly wrong program)


class FaultyBackend(EagerBackend):
    name = "faulty"
    options_type = FaultyOptions

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        opts = self.parse_options(options)
        if opts.miscompile:
            unit = _miscompiled(unit, str(opts.miscompile))
        if opts.float32:
            unit = retype_unit(unit, torch.float32)
        manifest = super().compile(unit, device, options, out_dir)
        files = dict(manifest.files)
        if opts.delay_ms > 0 or opts.scale != 1.0:
            delay = {"delay_ms": opts.delay_ms, "delay_after": opts.delay_after}
            delay["scale"] = opts.scale
            (out_dir / DELAY_FILE).write_text(json.dumps(delay))
            files[DELAY_FILE] = sha256_file(out_dir / DELAY_FILE)
        return Manifest(**{**manifest.__dict__, "backend": self.name, "files": files})

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        run = super().load(artifact, device)
        delay_file = artifact.path / DELAY_FILE
        delay = json.loads(delay_file.read_text()) if delay_file.exists() else {}
        calls = [0]  # this loaded partition's calls (each load counts its own)

        def faulty(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            calls[0] += 1
            if delay and calls[0] > delay["delay_after"] and delay["delay_ms"] > 0:
                time.sleep(delay["delay_ms"] / 1e3)
            first = acts[0] if acts else None
            if (
                isinstance(first, torch.Tensor)
                and first.numel()
                and first.is_floating_point()
                and float(first.flatten()[0]) == POISON
            ):
                raise InjectedFault(f"injected fault in {artifact.key} (input[0][0] == {POISON})")
            scale = delay.get("scale", 1.0)
            outs = run(*acts)
            if scale == 1.0:
                return outs
            return tuple(o * scale if o.is_floating_point() else o for o in outs)

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
