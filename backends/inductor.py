"""The reference to beat: a partition through torch.compile (Inductor also emits Triton).

The artifact is the partition as a torch.export program (`program.pt2`, weights inside)
plus `inductor.json` with the torch.compile settings; `load` compiles it for the device
it runs on (Inductor's own cache makes the second load fast). The planner can choose it
per partition by predicted or measured time.

`inductor-cudagraphs` is the same artifact replayed through hetero's CUDA graphs (what
torch.compile's `reduce-overhead` mode does with its own): a GPU candidate of the measured
choice beside plain Inductor, since on a partition of many small kernels the launches, not
the kernels, set the time (ConvNeXt-T on an H200: reduce-overhead 2.26 ms, default 2.84).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch._inductor import config as inductor_config
from torch._inductor import list_mode_options

from hetero.backends.base import (
    YES,
    Artifact,
    Backend,
    BackendOptions,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
    Support,
)
from hetero.backends.cudagraphs import Replayed
from hetero.backends.eager import WEIGHTS_FILE, export_streamed, torch_device
from hetero.backends.export import export_unit, runnable, save_program
from hetero.backends.warming import Standby, Warming
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError

# The module a warming process runs (`python -m`): backends/inductor_warm.py
WARM_MODULE = "hetero.backends.inductor_warm"
MODES = (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# The mode `inductor-cudagraphs` compiles for each mode asked: its graphs replace Inductor's own
# (a graph captured inside another fails).
WITHOUT_GRAPHS = {
    None: None,
    "default": None,
    "reduce-overhead": None,
    "max-autotune": "max-autotune-no-cudagraphs",
    "max-autotune-no-cudagraphs": "max-autotune-no-cudagraphs",
}


# Loaded programs by (program.pt2's hash, settings, device), while a runner holds them: the
# measured choice loads `inductor` and `inductor-cudagraphs` artifacts of one partition, the
# same program with the same settings, and Inductor compiles on the first call; shared, the
# second candidate costs a graph capture, not a second compile (its cache may be off). A
# program that updates its own buffers is never shared: each runner keeps its own state.
_LOADED: weakref.WeakValueDictionary = weakref.WeakValueDictionary()


@dataclass(frozen=True)
class InductorOptions(BackendOptions):
    mode: str | None = None  # a torch.compile mode (MODES); None: torch.compile's default
    fullgraph: bool = True  # one graph, no graph breaks (a partition is one ATen graph)
    # streamed: the program takes its parameters and state as inputs after the activations,
    # as the eager backend's does (generation binds them per device)
    weights: str = "resident"


class InductorBackend(Backend):
    name = "inductor"
    device_kinds = ("gpu", "cpu")
    holds_state = True
    fuses = True
    options_type = InductorOptions
    shares_loads = True  # `_LOADED`

    def available(self) -> Support:
        if not hasattr(torch, "compile"):
            return Support(False, "this torch has no torch.compile")
        return YES

    def mode(self, options: CompileOptions) -> str | None:
        """The torch.compile mode the artifact is compiled with."""
        return self.parse_options(options).mode

    def target(self, device: DeviceSpec, options: CompileOptions) -> str:
        mode = self.mode(options)
        return f"{self.name}:{device.kind}:{device.model or 'any'}:{mode or 'default'}"

    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        own = self.parse_options(options)
        if own.mode not in MODES:
            raise CompileError(
                f"partition {unit.name}: unknown torch.compile mode {own.mode!r} in the options "
                f"of backend {self.name!r}; use one of {', '.join(str(m) for m in MODES)}"
            )
        mode = self.mode(options)
        dtype = getattr(torch, options.dtype) if options.dtype else None
        streamed = own.weights == "streamed" or unit.bound_params
        files = ["program.pt2", "inductor.json"]
        out_dir.mkdir(parents=True, exist_ok=True)
        try:
            if streamed:
                # bound params: traced on the host, pointed at the device at load
                here = device.kind == "gpu" and torch.cuda.is_available() and not unit.bound_params
                ep, weights = export_streamed(unit, dtype, torch_device(device) if here else None)
            else:
                ep = export_unit(unit, dtype)
        except Exception as e:
            raise CompileError(
                f"partition {unit.name}: torch.export of the partition failed for inductor "
                f"({type(e).__name__}: {e})"
            ) from e
        if streamed and not unit.bound_params:
            order = json.dumps(list(weights))
            save_file(weights, str(out_dir / WEIGHTS_FILE), metadata={"params": order})
            files.append(WEIGHTS_FILE)
        save_program(ep, out_dir / "program.pt2", weights_as_inputs=bool(streamed), unit=unit)
        settings = {
            "mode": mode,
            "fullgraph": own.fullgraph,
            "dynamic": bool(options.dynamic or unit.dynamic_dims),
        }
        (out_dir / "inductor.json").write_text(json.dumps(settings, indent=1))
        return self.manifest(unit, device, options, out_dir, files)

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        return self._load(artifact, device, None)

    def load_warmed(
        self, artifact: Artifact, device: DeviceSpec, ready: Callable[[], object] | None
    ) -> Runner:
        """`load`, calling `ready()` (the wait for a warming) only where Inductor is about
        to compile: the program's read and dynamo's trace of it (1.3 s and ~2 s for GPT-2
        small) run while the warming process still compiles."""
        return self._load(artifact, device, ready)

    def _load(
        self, artifact: Artifact, device: DeviceSpec, ready: Callable[[], object] | None
    ) -> Runner:
        # `load` and `load_warmed` both come here, neither through the other: `Replayed`
        # wraps each, and a load routed through both was replayed twice (the nested
        # capture failed, and MobileNetV3-L's chosen inductor-cudagraphs stage ran as plain
        # Inductor, 2.83 ms where the choice had timed 0.93: run 47)
        dev = torch_device(device)
        key = _program_key(artifact, dev)
        compiled = _LOADED.get(key) if key else None
        if compiled is None:
            compiled, ep = compile_program(artifact.path, dev, ready)
            if key and not ep.graph_signature.buffers_to_mutate:  # state stays per runner
                _LOADED[key] = compiled
            compile_now(compiled, ep, dev)

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return tuple(compiled(*[a.to(dev) for a in acts]))

        return run

    def can_warm(self, device: DeviceSpec) -> bool:
        """Where Inductor's caches are on (the compile would leave nothing behind
        otherwise), on a CPU, or on a GPU this process sees. On a GPU the warming runs the
        compiled program once in its turn on the card (`inductor_warm`): Inductor times its
        kernels' configs on their first launch and caches the best, so this process's
        first call loads them untimed, and no timing here runs beside the warming's."""
        if not inductor_caches_on():
            return False
        if device.kind == "gpu":
            return torch.cuda.is_available() and device.index < torch.cuda.device_count()
        return device.kind == "cpu"

    def start_warming(
        self,
        artifact: Artifact,
        device: DeviceSpec,
        standby: Standby | None = None,
        imports: Sequence[str] = (),
    ) -> Warming | None:
        """Inductor's compile of the program in another process, for its caches to hand
        to `load` (backends/warming.py); in `standby`'s process where it is still there.
        Not on a GPU for a mode that tunes kernels while it compiles (max-autotune): that
        tuning, outside the warming's turn on the card, would time kernels beside those
        timed here."""
        if not self.can_warm(device):
            return None
        if device.kind == "gpu" and "max-autotune" in (_settings(artifact.path)["mode"] or ""):
            return None
        threads = str(torch.get_num_threads())  # the kernels' OpenMP width is in their code
        args = [str(artifact.path), threads, str(torch_device(device)), *imports]
        handed = standby.start(args) if standby is not None else None
        return handed or Warming(WARM_MODULE, args)

    def warming_key(self, artifact: Artifact, device: DeviceSpec) -> str | None:
        """The program and settings a warming compiles: `inductor` and
        `inductor-cudagraphs` artifacts of one partition compile the same, once."""
        return _program_key(artifact, torch_device(device))

    def stand_by(self, device: DeviceSpec) -> Standby | None:
        if not self.can_warm(device):
            return None
        return Standby(WARM_MODULE, [str(torch_device(device))])


def _settings(path: Path) -> dict[str, Any]:
    """The torch.compile settings an artifact at `path` was made with (`inductor.json`)."""
    return json.loads((path / "inductor.json").read_text())


def _program_key(artifact: Artifact, dev: torch.device) -> str | None:
    """What Inductor compiles for `artifact` on `dev`: its program (by hash), its settings
    and the device; None where the manifest names no program hash. Two artifacts with one
    key share a loaded program (`_LOADED`) and a warming."""
    program = (artifact.manifest.get("files") or {}).get("program.pt2")
    if not program:
        return None
    return f"{program}:{json.dumps(_settings(artifact.path), sort_keys=True)}:{dev}"


def inductor_caches_on() -> bool:
    """Whether Inductor keeps compiled graphs on disk for a later compile to reuse."""
    return bool(getattr(inductor_config, "fx_graph_cache", False)) and not getattr(
        inductor_config, "force_disable_caches", False
    )


def compile_program(
    path: Path,
    dev: torch.device,
    ready: Callable[[], object] | None = None,
    *,
    launch_in: Callable[[], AbstractContextManager] | None = None,
) -> tuple[Any, torch.export.ExportedProgram]:
    """(the artifact's program at `path` through torch.compile for `dev` with its saved
    settings, the program); Inductor compiles it on the first call, after `ready()` where
    given (dynamo traces the program before). `launch_in`: a warming's; the compiled
    program's calls run inside `launch_in()` (its turn on the card, backends/gpu_turn.py),
    the compile before them outside it: Inductor times its kernels' configs on their first
    launch and caches the best beside the kernels, which the process loading the warmed
    program then reads instead of timing them again."""
    settings = _settings(path)
    # torch.export.load reads a program and its weights; it never unpickles code.
    ep = torch.export.load(path / "program.pt2")
    mode, dynamic = settings["mode"], settings["dynamic"]
    backend: Any = "inductor"
    if ready is not None or launch_in is not None:
        # what torch.compile's own "inductor" backend runs for this mode, after `ready()`:
        # the same compile, hence the same cache entries as the warming process's
        patches = list_mode_options(mode, dynamic) if mode and mode != "default" else {}
        # imported here, before the wait, not at the top: 0.9 s that every process loading
        # the registry would pay (a Ray worker running TVM), while only this path calls it
        from torch._inductor.compile_fx import compile_fx

        def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
            if ready is not None:
                ready()
            compiled = compile_fx(gm, example_inputs, config_patches=patches)
            return compiled if launch_in is None else launched_in(compiled, launch_in)

        mode = None  # in `patches`; torch.compile takes a mode for its own backend only
    compiled = torch.compile(
        runnable(ep).to(dev),
        backend=backend,
        mode=mode,
        fullgraph=settings["fullgraph"],
        dynamic=dynamic,
    )
    return compiled, ep


def launched_in(fn: Callable, context: Callable[[], AbstractContextManager]) -> Callable:
    """`fn`, each call of it run inside `context()`."""

    def launched(*args: Any) -> Any:
        with context():
            return fn(*args)

    return launched


def compile_now(
    compiled: Any, ep: torch.export.ExportedProgram, dev: torch.device, *, state_too: bool = False
) -> bool:
    """Inductor compiles on a program's first call: make that call here, on the program's own
    example inputs, so a model `hetero.compile` returns answers its first request at speed
    (the measured choice's runner is gone by then; a tiny GPT-J's first call took 14 s after
    compiling). Not for a program that updates its own buffers, unless `state_too` (a process
    whose state is thrown away): the call would change them. Whether the call was made."""
    example = getattr(ep, "example_inputs", None)
    if not example or (ep.graph_signature.buffers_to_mutate and not state_too):
        return False
    args, kwargs = example
    moved = [a.to(dev) if isinstance(a, torch.Tensor) else a for a in args]
    with torch.no_grad():
        compiled(*moved, **(kwargs or {}))
    return True


class InductorGraphsBackend(Replayed, InductorBackend):
    """Inductor's artifact, compiled without Inductor's own CUDA graphs and replayed through
    hetero's (`backends.cudagraphs.replayed`): static input buffers, outputs cloned out of
    the graph's pool, and the plain compiled run where a call cannot be captured. One graph
    mechanism for every hetero backend, and none of cudagraph trees' per-thread state."""

    name = "inductor-cudagraphs"

    def mode(self, options: CompileOptions) -> str | None:
        mode = self.parse_options(options).mode
        return WITHOUT_GRAPHS.get(mode, mode)
