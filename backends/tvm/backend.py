"""TVM backend: partition -> torch.export -> Relax -> tvm.compile -> export_library (.so).

Targets: llvm for CPUs, the same llvm build for `npu` devices (no NPU is reachable: the
artifact runs emulated on the host, with the NPU's op set and dtypes enforced by
`supports`), and CUDA with dlight's default GPU schedules.

Weights enter the Relax module as constants, so TVM constant-folds everything that depends
only on weights at compile time (weight transposes for the BLAS dispatch, casts to the
compile dtype, position tables) and no per-call work or extra copy is spent on them. On a
CPU the folded weights then leave the module for `params.safetensors` beside the library
(params.py says what keeping them inside cost); the cache checks both files' sha256 before
the native code is ever mapped, and a loader needs nothing but the TVM runtime and torch.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import os
import platform
import threading
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from hetero.backends.base import (
    YES,
    Artifact,
    Backend,
    CompileOptions,
    CompileUnit,
    Manifest,
    Runner,
    Support,
)
from hetero.backends.export import size_carrier
from hetero.backends.tvm import targets
from hetero.backends.tvm.frontend import unsupported_reason
from hetero.backends.tvm.kernels import register_kernels
from hetero.backends.tvm.lower import build
from hetero.backends.tvm.options import TVMOptions
from hetero.backends.tvm.params import PARAMS, load_params, save_params
from hetero.cluster.spec import DeviceSpec
from hetero.environment import BIND_THREADS, THREAD_ENV
from hetero.errors import CompileError
from hetero.partitioner.graph import OpNode

LIBRARY = "module.so"

# What an NPU runs: dense tensor math. Data-dependent indexing (embedding lookups,
# gathers, scatters) and host-side data ops stay on the CPU, as real NPU toolchains
# (RKNN, Ethos-U, Hexagon NN) place them.
NPU_OP_CLASSES = frozenset(
    {"matmul", "conv", "attention", "norm", "reduction", "elementwise", "view"}
)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


@functools.cache
def _lowering_fingerprint() -> str:
    """Hash of the sources that decide what an artifact contains, so a changed lowering or
    schedule never loads a stale cached artifact (a hand-bumped number was forgotten once)."""
    here = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for name in sorted(p.name for p in here.glob("*.py")):
        h.update(name.encode())
        h.update((here / name).read_bytes())
    return h.hexdigest()[:16]


class TVMBackend(Backend):
    name = "tvm"
    device_kinds = ("cpu", "npu", "gpu")
    fuses = True
    choice_kinds = ("cpu",)  # its GPU code is untuned: the GPU's choice is triton/inductor/...
    options_type = TVMOptions

    # ---- what it can do ------------------------------------------------------------------------
    def available(self) -> Support:
        try:
            import tvm  # noqa: F401
        except ImportError as e:
            return Support(False, f"apache-tvm is not importable ({e}); pip install 'hetero[tvm]'")
        return YES

    def supports(self, node: OpNode, device: DeviceSpec) -> Support:
        base = super().supports(node, device)
        if not base:
            return base
        avail = self.available()
        if not avail:
            return avail

        why = unsupported_reason(node.target)
        if why:
            return Support(False, why)
        if device.kind == "npu":
            if node.op_class not in NPU_OP_CLASSES:
                return Support(False, f"the NPU does not run {node.op_class} ops ({node.target})")
            for m in (*node.in_meta, *node.out_meta):
                if m.is_tensor and m.dtype not in device.dtypes and m.dtype != "bool":
                    return Support(
                        False,
                        f"the NPU {device.name} has no {m.dtype} ({node.target}); "
                        f"it computes in {', '.join(device.dtypes)}",
                    )
        return YES

    def target(self, device: DeviceSpec, options: CompileOptions) -> str:
        return targets.target_string(device, options)

    def versions(self) -> dict[str, str]:
        return {
            "torch": torch.__version__,
            "apache-tvm": _version("apache-tvm"),
            "apache-tvm-ffi": _version("apache-tvm-ffi"),
            "hetero-tvm-lowering": _lowering_fingerprint(),
        }

    # ---- compile -------------------------------------------------------------------------------
    def compile(
        self, unit: CompileUnit, device: DeviceSpec, options: CompileOptions, out_dir: Path
    ) -> Manifest:
        where = f"partition {unit.name} on {device.name} ({self.target(device, options)})"
        dtype = getattr(torch, options.dtype) if options.dtype else None
        try:
            ex, out_spec, weights = build(unit, device, options, dtype)
            ex.export_library(str(out_dir / LIBRARY))
            if weights:
                save_params(weights, out_dir / PARAMS)
        except Exception as e:  # TVM raises many types; all mean "this partition did not build"
            raise CompileError(f"TVM could not compile {where}: {type(e).__name__}: {e}") from e
        return self.manifest(
            unit,
            device,
            options,
            out_dir,
            [LIBRARY, PARAMS] if weights else [LIBRARY],
            versions={**self.versions(), "host": platform.machine()},
            params=len(weights),
            emulated=device.kind == "npu" or device.emulated,
            out_spec=_spec_string(out_spec, len(unit.outputs)),
            dtype=options.dtype or "",
            notes=(
                "dense matmuls call torch's BLAS through the TVM FFI function "
                "'hetero.torch.matmul'; register_kernels() before running"
                if device.kind != "gpu"
                else "cuda; dlight default schedules"
            ),
        )

    # ---- load ------------------------------------------------------------------------------------
    def prepare_process(self, device: DeviceSpec) -> None:
        """Size the thread pools as `load` does (TVM_BIND_THREADS, torch's threads)."""
        if device.kind != "gpu":
            _set_threads(targets.threads_for(device))

    def load(self, artifact: Artifact, device: DeviceSpec) -> Runner:
        """Map the verified .so and wrap its Relax VM. Only TVM's runtime is needed here (and
        torch, for the BLAS kernels), never its compiler: with TVM_USE_RUNTIME_LIB=1 a worker
        loads libtvm_runtime.so alone (checked: libtvm_compiler.so is never mapped)."""
        import tvm  # optional (hetero[tvm]): loaded on first use
        from tvm.runtime.vm import VirtualMachine  # not tvm.relax: that needs the compiler

        register_kernels()
        if device.kind == "gpu":
            dev = tvm.cuda(device.index)
            tdev = torch.device("cuda", device.index)
        else:
            dev = tvm.cpu(0)
            tdev = torch.device("cpu")
            self.prepare_process(device)
        lib = tvm.runtime.load_module(str(artifact.path / LIBRARY))
        count = int(artifact.manifest.get("params") or 0)
        # torch's tensors own the memory; TVM's views of them are made once, not per call
        weights = tuple(
            tvm.runtime.from_dlpack(w)
            for w in (load_params(artifact.path / PARAMS, count, tdev) if count else ())
        )
        vm = VirtualMachine(lib, dev)
        main = vm["main"]
        spec = artifact.manifest.get("out_spec") or ""
        tree = pytree.treespec_loads(spec) if spec else None
        cast = (
            getattr(torch, artifact.manifest["dtype"]) if artifact.manifest.get("dtype") else None
        )
        # The VM keeps one call's frames and registers at a time: two threads calling it
        # at once (a server's request threads) crashed the process in AllocTensor. Calls
        # take turns; they would share the same cores anyway.
        turn = threading.Lock()

        def run(*acts: torch.Tensor) -> tuple[torch.Tensor, ...]:
            # A tuple-valued input (a multi-output op cut from its getitems) arrives flattened.
            flat_in = pytree.tree_leaves(acts)
            if cast is not None:
                flat_in = [
                    a.to(cast) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                    for a in flat_in
                ]
            # A dynamic partition also exchanges its symbolic sizes (SymInts) as plain ints;
            # the artifact takes them as size carriers (export.size_carrier) and returns ints.
            args = [
                tvm.runtime.from_dlpack(
                    (a if isinstance(a, torch.Tensor) else size_carrier(int(a)))
                    .to(tdev)
                    .contiguous()
                )
                for a in flat_in
            ]
            with turn:
                out = main(*args, *weights)
            outs = tuple(out) if not isinstance(out, tvm.runtime.Tensor) else (out,)
            flat = [torch.from_dlpack(o) if isinstance(o, tvm.runtime.Tensor) else o for o in outs]
            return tuple(pytree.tree_unflatten(flat, tree)) if tree is not None else tuple(flat)

        return run


def _spec_string(spec, n_outputs: int) -> str:
    """The outputs' pytree spec, or "" when they are `n_outputs` plain tensors."""
    if spec is None or spec.num_leaves == n_outputs:
        return ""
    return pytree.treespec_dumps(spec)


@functools.cache
def _set_threads(n: int) -> None:
    """Size TVM's and torch's CPU thread pools once per process (a worker owns its process),
    leaving every thread free to run on any of the process's cores."""
    import tvm  # optional (hetero[tvm]): loaded on first use

    # Pinned, the calling thread would hand its one-core mask to every OpenMP worker torch
    # creates after it (hetero/environment.py says what that cost). The variable is read
    # when the pool is sized; a person who set it keeps their value, and the caller's own
    # mask is put back either way.
    os.environ.setdefault(BIND_THREADS, THREAD_ENV[BIND_THREADS])
    mask = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    tvm.get_global_func("runtime.config_threadpool")(0, n)
    if mask is not None and os.sched_getaffinity(0) != mask:
        os.sched_setaffinity(0, mask)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
