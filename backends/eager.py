"""The reference backend: the partition as plain PyTorch, saved as a torch.export `.pt2`.

Option `weights="streamed"` (`EagerOptions`): the program takes its parameters as
inputs after the activations and the weights go to `weights.safetensors`, so the runtime
can keep them in host memory and stream them to the GPU before each call
(runtime/streaming.py); `load_weights` reads them back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils import _pytree as pytree

from hetero.backends.base import (
    Artifact,
    Backend,
    BackendOptions,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
)
from hetero.backends.export import dynamic_spec, export_unit, runnable, save_program
from hetero.backends.lifted import lifted_program
from hetero.backends.linear_fold import fold_linears
from hetero.backends.reshape_views import reshape_views
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError

WEIGHTS_FILE = "weights.safetensors"
WEIGHT_HOMES = ("resident", "streamed")


@dataclass(frozen=True)
class EagerOptions(BackendOptions):
    # resident: parameters inside the program; streamed: they are runner inputs after the
    # activations, stored in `weights.safetensors` (the runtime streams them to the GPU)
    weights: str = "resident"

    def __post_init__(self) -> None:
        if self.weights not in WEIGHT_HOMES:
            raise ConfigError(
                f"option 'weights' of backend 'eager': {self.weights!r} is not one of "
                f"{', '.join(WEIGHT_HOMES)}"
            )


class _ParamsAsInputs(torch.nn.Module):
    """The partition's GraphModule called with activations, then parameters, as inputs."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__()
        self.gm = gm

    def forward(self, *args: torch.Tensor):
        return tuple(self.gm(*args))


def export_streamed(
    unit: CompileUnit, dtype: torch.dtype | None = None, device: torch.device | None = None
) -> tuple[torch.export.ExportedProgram, dict[str, torch.Tensor]]:
    """The unit exported with its parameters as inputs, and those parameters by name
    (contiguous host copies, in the order the program takes them; none when the unit's
    params are bound by the runtime). `device`: where the
    piece runs (its examples and weights are traced there, next to the module's own
    constants); None: where its first activation is. Both are the unit's `SharedExports`
    ones when it has them (then shared: change neither)."""
    if device is None:
        device = next(
            (
                t.device
                for t in pytree.tree_leaves(unit.example_inputs)
                if isinstance(t, torch.Tensor)
            ),
            torch.device("cpu"),
        )
    if unit.exports is None:
        return _export_streamed(unit, dtype, device)
    return unit.exports.get(
        ("streamed", dtype, device), lambda: _export_streamed(unit, dtype, device)
    )


def _export_streamed(
    unit: CompileUnit, dtype: torch.dtype | None, device: torch.device
) -> tuple[torch.export.ExportedProgram, dict[str, torch.Tensor]]:
    def cast(t: torch.Tensor) -> torch.Tensor:
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t

    # An example can sit elsewhere than the piece runs (a value made by a CPU partition):
    # traced there, it would meet the module's device constants in one op.
    acts = tuple(
        pytree.tree_map(lambda t: cast(t).to(device) if isinstance(t, torch.Tensor) else t, a)
        for a in unit.example_inputs
    )
    if unit.bound_params:  # the runtime has the weights: trace with them where they are
        weights = {}
        example_params = tuple(
            cast(unit.param_values[name].detach()).to(device) for name in unit.params
        )
    else:
        weights = {
            name: cast(unit.param_values[name].detach()).contiguous().cpu() for name in unit.params
        }
        example_params = tuple(w.to(device) for w in weights.values())
    args = (*acts, *example_params)
    # the partition's graph as captured: wrapped as it is, not traced once more
    ep = lifted_program(unit.module, args)
    if ep is not None:
        return ep, weights
    with torch.no_grad():
        ep = torch.export.export(
            _ParamsAsInputs(unit.module).eval(),
            args,
            dynamic_shapes=dynamic_spec(unit, len(args)),
            strict=False,
        )
    return ep, weights


def load_weights(artifact: Artifact) -> dict[str, torch.Tensor]:
    """A streamed artifact's parameters (host tensors), in the order its runner takes them."""
    path = str(Path(artifact.path) / WEIGHTS_FILE)
    with safe_open(path, framework="pt") as f:
        names = json.loads((f.metadata() or {}).get("params", "[]"))
    weights = load_file(path)
    return {n: weights[n] for n in names}


def traced_strides(ep: torch.export.ExportedProgram) -> list[tuple[int, ...] | None]:
    """The strides each user input (flattened) was traced with; None where not a tensor or
    not static. The captured graph's views assume them: a value may reach the partition
    with others (another artifact's output where the whole model's eager run, which made
    the example, returned a copy), and a view then fails or misreads."""
    out = []
    for val in traced_inputs(ep):
        stride = tuple(val.stride()) if isinstance(val, torch.Tensor) else None
        out.append(stride if stride and all(isinstance(d, int) for d in stride) else None)
    return out


def symbolic_dims(ep: torch.export.ExportedProgram) -> tuple[tuple[int, int], ...]:
    """(user input, dim) of every size `ep` was traced with as a symbol (a prompt's length):
    what a compiler of the program should keep dynamic, and nothing else."""
    return tuple(
        (k, d)
        for k, val in enumerate(traced_inputs(ep))
        if isinstance(val, torch.Tensor)
        for d, size in enumerate(val.shape)
        if not isinstance(size, int)
    )


def traced_inputs(ep: torch.export.ExportedProgram) -> list[Any]:
    """The value each user input (flattened) was traced with (a fake tensor, a SymInt...)."""
    user = set(ep.graph_signature.user_inputs)
    return [n.meta.get("val") for n in ep.graph.nodes if n.op == "placeholder" and n.name in user]


def restride(acts: tuple, strides: list[tuple[int, ...] | None]) -> tuple:
    """`acts` with every tensor in the strides its program was traced with (a copy only
    where they differ)."""
    leaves, spec = pytree.tree_flatten(acts)
    if len(leaves) != len(strides):
        return acts
    fixed = []
    for a, want in zip(leaves, strides, strict=True):
        if isinstance(a, torch.Tensor) and want is not None and a.stride() != want:
            b = torch.empty_strided(a.shape, want, dtype=a.dtype, device=a.device)
            a = b.copy_(a)
        fixed.append(a)
    return pytree.tree_unflatten(fixed, spec)


def traced_layouts(ep: torch.export.ExportedProgram) -> list[tuple[int, ...] | None]:
    """Per user input (flattened): the order of its dims in memory as traced, outermost
    first (None where not a tensor). Unlike `traced_strides` it holds for dynamic shapes
    (ordered by the example's strides): a permuted view traced with a symbolic prompt length
    still says which dim is innermost."""
    out = []
    for val in traced_inputs(ep):
        if not isinstance(val, torch.Tensor) or val.dim() < 2:
            out.append(None)
            continue
        hints = [_hint(d) for d in val.stride()]
        out.append(
            None if None in hints else tuple(sorted(range(val.dim()), key=lambda d: -hints[d]))
        )
    return out


def _hint(x: int | torch.SymInt) -> int | None:
    if isinstance(x, int):
        return x
    hint = getattr(x.node, "hint", None)
    return int(hint) if hint is not None else None


def relayout(a: torch.Tensor, order: tuple[int, ...] | None) -> torch.Tensor:
    """`a` laid out in memory in dim `order` (outermost first), dense; `a` itself where it
    already is (dims of size 1 are free to sit anywhere). A value that crossed from another
    backend (TVM returns dense tensors) may reach a program traced on a permuted view, whose
    later `view` then fails."""
    if order is None or a.dim() != len(order):
        return a
    want = [0] * a.dim()
    step = 1
    for d in reversed(order):
        want[d] = step
        step *= a.shape[d]
    got = a.stride()
    if all(a.shape[d] == 1 or got[d] == want[d] for d in range(a.dim())):
        return a
    return torch.empty_strided(a.shape, want, dtype=a.dtype, device=a.device).copy_(a)


def torch_device(device: DeviceSpec) -> torch.device:
    if device.kind == "gpu":
        return torch.device("cuda", device.index)
    return torch.device("cpu")


class EagerBackend(Backend):
    name = "eager"
    device_kinds = ("cpu", "gpu", "npu")
    holds_state = True
    # On a GPU it never beat a compiled candidate (issue 15's suite on an H200: GPT-2,
    # BERT, LLaMA, ConvNeXt-T, MobileNetV3-L), and `cudagraphs` replays this same program;
    # its export, load and first run were ~2 s of each compile (ConvNeXt-T 1.7, MobileNet
    # 2.6). Measured still where every compiled candidate fails its check.
    last_resort_kinds = ("gpu",)
    options_type = EagerOptions

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        dtype = getattr(torch, options.dtype) if options.dtype else None
        # bound params: inputs like streamed ones, but the runtime has the weights
        streamed = self.parse_options(options).weights == "streamed" or unit.bound_params
        files = ["program.pt2"]
        if streamed:
            # bound params: traced on the host, pointed at the device at load
            here = device.kind == "gpu" and torch.cuda.is_available() and not unit.bound_params
            ep, weights = export_streamed(unit, dtype, torch_device(device) if here else None)
            if not unit.bound_params:
                # safetensors orders tensors its own way: the metadata keeps the runner's order
                order = json.dumps(list(weights))
                save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"params": order})
                files.append(WEIGHTS_FILE)
        else:
            ep = export_unit(unit, dtype)
        save_program(ep, out_dir / "program.pt2", weights_as_inputs=bool(streamed), unit=unit)
        return self.manifest(
            unit,
            device,
            options,
            out_dir,
            files,
            emulated=device.kind == "npu",
            dtype=options.dtype or "",
            notes="weights streamed: parameters are inputs after the activations"
            if streamed
            else "",
        )

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        # torch.export.load reads a program and its weights; it never unpickles code.
        ep = torch.export.load(artifact.path / "program.pt2")
        dev = torch_device(device)
        mod = runnable(ep).to(dev)
        fold_linears(mod)  # run op by op: a dispatch per Linear instead of four
        reshape_views(mod)  # its views may meet another device's strides

        cast = (
            getattr(torch, artifact.manifest["dtype"]) if artifact.manifest.get("dtype") else None
        )

        def move(a: torch.Tensor) -> torch.Tensor:
            if cast is not None and a.is_floating_point():
                a = a.to(cast)
            return a.to(dev)

        strides = traced_strides(ep)

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                # an activation may be a tuple (a multi-output op cut from its getitems)
                return tuple(mod(*restride(pytree.tree_map(move, acts), strides)))

        return run
