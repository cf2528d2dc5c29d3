"""The Triton backend: fold weights, fuse the ATen graph, generate kernels, tune, load.

Artifact files (all hashed in the manifest):
  program.py           the generated Triton kernels, their launchers and `forward`
  weights.safetensors  the partition's weights after folding, contiguous, in `forward` order
  fusion.txt           the fusion plan: one line per step (kind, rule, ATen nodes)
  triton.json          inputs, weight names, kernels and how `load` should run them

Without CUDA the backend still compiles and, with TRITON_INTERPRET=1, loads onto the CPU:
every kernel then runs in Triton's interpreter (that is how the tests check kernels).
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

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
from hetero.backends.reshape_views import reshape_views
from hetero.backends.triton.autotune import (
    PRECOMPILE_THREADS,
    TuneCache,
    Tuned,
    cache_file,
    tune,
)
from hetero.backends.triton.codegen import generate
from hetero.backends.triton.fold import Folded, fold_weights
from hetero.backends.triton.fuse import fuse
from hetero.backends.triton.graphs import replay_or_run
from hetero.backends.triton.rewrite import rewrite
from hetero.cluster.spec import DeviceSpec
from hetero.errors import CompileError, WorkerError

FILES = ("program.py", "weights.safetensors", "fusion.txt", "triton.json")


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def run_device(device: DeviceSpec) -> torch.device:
    """Where a Triton partition runs here: its GPU, or the CPU under the interpreter."""
    if torch.cuda.is_available() and not interpreting():
        return torch.device("cuda", device.index)
    if interpreting():
        return torch.device("cpu")
    raise WorkerError(
        f"the triton backend needs CUDA to run on {device.name}, and none is visible here. "
        "Run on a machine with an NVIDIA GPU, choose another backend for this device, or set "
        "TRITON_INTERPRET=1 to run the kernels slowly on the CPU (tests)."
    )


@dataclass(frozen=True)
class TritonOptions(BackendOptions):
    cuda_graphs: bool = True  # replay the partition's kernels as one CUDA graph
    clone_outputs: bool = True  # copy outputs out of the CUDA graph's memory pool
    tune: bool = True  # autotune kernel configs on a GPU (cached in `tune_cache`)
    tune_cache: str | None = None  # a directory; None: `triton-autotune` beside the artifact
    # threads compiling every kernel and tile config before the timing (autotune.precompile);
    # 0: autotune.PRECOMPILE_THREADS; 1: each config compiled as it is timed, no precompile
    compile_threads: int = 0
    # NHWC activations between convolutions; None: for float16/bfloat16 convolution weights
    channels_last: bool | None = None


class TritonBackend(Backend):
    name = "triton"
    device_kinds = ("gpu",)
    fuses = True
    options_type = TritonOptions

    def available(self) -> Support:
        if importlib.util.find_spec("triton") is None:
            return Support(False, "triton is not installed (pip install 'hetero[triton]')")
        return YES

    def target(self, device: DeviceSpec, options: CompileOptions) -> str:
        mode = "interpret" if interpreting() or not torch.cuda.is_available() else "cuda"
        return f"triton:gpu:{device.model or 'any'}:{mode}"

    def versions(self) -> dict[str, str]:
        import triton  # optional (hetero[triton]): loaded on first use

        return {"torch": torch.__version__, "triton": triton.__version__}

    # ---- compile -----------------------------------------------------------------------------
    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        if options.dynamic or unit.dynamic_dims:
            raise CompileError(
                f"partition {unit.name}: the triton backend compiles static shapes only and "
                f"this partition has dynamic dims {unit.dynamic_dims}. Compile it with static "
                "shapes, or choose the 'inductor' or 'eager' backend for it."
            )
        dtype = getattr(torch, options.dtype) if options.dtype else None
        acts = tuple(
            t.to(dtype) if dtype is not None and t.is_floating_point() else t
            for t in unit.example_inputs
        )
        steps: dict[str, float] = {}  # where this compile's time went (Manifest.build_seconds)
        counts: dict[str, int] = {}
        start = time.perf_counter()
        try:
            folded = prepare(unit.module, unit.inputs, unit.param_values, acts, dtype)
            weights = tuple(t for _, t in folded.weights)
            plan = fuse(folded.module)
        except Exception as e:
            raise CompileError(
                f"partition {unit.name}: the triton backend could not fuse its graph "
                f"({type(e).__name__}: {e})"
            ) from e
        own = self.parse_options(options)
        interpret = self.target(device, options).endswith("interpret")
        wnames = tuple(n for n, _ in folded.weights)
        cache = TuneCache(
            cache_file(
                Path(own.tune_cache or out_dir.parent / "triton-autotune"),
                torch.cuda.get_device_name(device.index) if not interpret else "interpreter",
            )
        )
        known = cache.read()
        layout = frozenset(channels_last_weights(folded.module, wnames, own.channels_last))
        steps["fuse"] = time.perf_counter() - start
        start = time.perf_counter()
        program = generate(plan, wnames, interpret, known, layout)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "program.py").write_text(program.source)
        steps["codegen"] = time.perf_counter() - start
        counts["kernels"] = len(program.kernels)
        if not interpret and own.tune:
            start = time.perf_counter()
            tuned = self._tune(out_dir, program, acts, weights, device, known,
                               options.tune_trials, own.compile_threads)  # fmt: skip
            steps["autotune"] = time.perf_counter() - start
            steps["autotune compile"] = tuned.compile_s
            counts |= {"tuned": tuned.kernels, "configs": tuned.configs}
            if tuned.found:
                cache.write(tuned.found)
                program = generate(plan, wnames, interpret, {**known, **tuned.found}, layout)
                (out_dir / "program.py").write_text(program.source)
        start = time.perf_counter()
        _save_weights(out_dir / "weights.safetensors", folded.weights)
        (out_dir / "fusion.txt").write_text(plan.table() + "\n")
        config = {
            "inputs": list(program.inputs),
            "weights": list(wnames),
            "kernels": [k.__dict__ for k in program.kernels],
            "steps": len(plan.steps),
            "channels_last": sorted(layout),
            "cuda_graphs": own.cuda_graphs,
            "clone_outputs": own.clone_outputs,
        }
        (out_dir / "triton.json").write_text(json.dumps(config, indent=1))
        manifest = self.manifest(
            unit,
            device,
            options,
            out_dir,
            list(FILES),
            notes=f"{len(program.kernels)} kernels, {plan.kernels()} fused launches, "
            f"{len(plan.steps) - plan.kernels()} ATen calls",
        )
        steps["weights"] = time.perf_counter() - start  # written, then hashed for the manifest
        return replace(manifest, build_seconds=steps, build_counts=counts)

    def _tune(self, out_dir, program, acts, weights, device, known, trials, threads) -> Tuned:
        dev = torch.device("cuda", device.index)
        mod = _import(out_dir / "program.py", f"hetero_triton_tune_{id(program)}")
        args = [a.to(dev) for a in acts] + [w.to(dev) for w in weights]
        with torch.no_grad():
            return tune(mod, program.kernels, lambda: mod.forward(*args), known, trials, dev,
                        threads=threads or PRECOMPILE_THREADS)  # fmt: skip

    # ---- load --------------------------------------------------------------------------------
    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        dev = run_device(device)
        config = json.loads((artifact.path / "triton.json").read_text())
        mod = _import(artifact.path / "program.py", f"hetero_triton_{artifact.key or id(config)}")
        table = load_file(str(artifact.path / "weights.safetensors"), device=str(dev))
        cl = set(config.get("channels_last", ()))
        weights = [_channels_last(table[n]) if n in cl else table[n] for n in config["weights"]]

        def forward(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            return tuple(mod.forward(*acts, *weights))

        fn = forward
        if dev.type == "cuda" and config.get("cuda_graphs", True):
            # a program that cannot be captured runs uncaptured: transformers' Mixtral copies
            # a host tensor in its expert routing, and the candidate failed (run 47)
            fn = replay_or_run(forward, dev, clone_outputs=config.get("clone_outputs", True))

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            with torch.no_grad():
                return fn(*[a.to(dev) for a in acts])

        return run


def prepare(gm: torch.fx.GraphModule, inputs: tuple[str, ...], params: Mapping[str, torch.Tensor],
            acts: tuple[torch.Tensor, ...], dtype: torch.dtype | None = None) -> Folded:  # fmt: skip
    """Fold weights, rewrite (rewrite.py), and fold again what the rewrites made constant;
    every node carries fresh meta['val'] for fusion. Bare `view`s become `reshape`s first
    (backends/reshape_views.py): the trace may have elided a `contiguous` that another
    attention kernel's layout needs (torch 2.11's SDPA on an H200 returned [b, h, s, d] where
    the trace had [b, s, h, d], and a LLaMA's compile stopped at the view before `o_proj`)."""
    folded = fold_weights(gm, inputs, params, dtype)
    reshape_views(folded.module)
    _propagate(folded.module, (*acts, *(t for _, t in folded.weights)))
    if rewrite(folded.module):
        folded = fold_weights(folded.module, folded.inputs, dict(folded.weights))
        _propagate(folded.module, (*acts, *(t for _, t in folded.weights)))
    return folded


def channels_last_weights(gm: torch.fx.GraphModule, wnames: tuple[str, ...],
                          force: bool | None) -> list[str]:  # fmt: skip
    """Convolution weights (4-D, 5-D) to hold channels-last, so that cuDNN runs its NHWC
    kernels (what tensor cores run) and the epilogues keep activations NHWC. Option
    `channels_last`: True / False; None: for float16 and bfloat16 weights."""
    names = set(wnames)
    found: dict[str, None] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target is not torch.ops.aten.convolution.default:
            continue
        w = node.args[1]
        v = w.meta.get("val") if isinstance(w, torch.fx.Node) else None
        if not isinstance(v, torch.Tensor) or w.name not in names or v.dim() not in (4, 5):
            continue
        if force or (force is None and v.dtype in (torch.float16, torch.bfloat16)):
            found[w.name] = None
    return list(found)


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    fmt = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.contiguous(memory_format=fmt)


def _propagate(gm: torch.fx.GraphModule, args: tuple) -> None:
    """Fresh meta['val'] (shapes, dtypes, strides) after folding and casting."""

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    FakeTensorProp(gm, mode).propagate(*[mode.from_tensor(a) for a in args])


def _save_weights(path: Path, weights: tuple[tuple[str, torch.Tensor], ...]) -> None:
    # safetensors refuses tensors that share memory; every weight gets its own copy.
    save_file({n: t.detach().cpu().contiguous().clone() for n, t in weights}, str(path))


def _import(path: Path, name: str):
    """Import a generated program from its file (Triton reads kernel source from the file)."""
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise CompileError(f"cannot import the generated program {path}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # triton's JIT resolves globals through the module
    spec.loader.exec_module(mod)
    return mod
