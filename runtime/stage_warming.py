"""A generation's Inductor compiles started in other processes the moment each stage's
artifact is written, so that they run side by side and beside the rest of the build.

A generation's GPU programs compile on the first request, one after the other, in the
process that runs them: the 1.1B LLaMA's prefill and decode programs took 49.6 s of a 95.7 s
compile on an H100 host (backend_suite.md, run 47), after 16.9 s of writing those programs.
Inductor's compile holds Python's lock and torch's tracing state, so a thread cannot overlap
it (backends/warming.py); a process can: `runtime/stage_warm.py` compiles a stage's program
exactly as the binder will (`stage_compile.InductorStage`, on zero-filled inputs laid out as
traced), which leaves Inductor's cache entries, and the binder's own compile, told to wait
for it (`ready`), reads them back. Prefill's warming starts while decode's program is still
being written; both compile at once.

A warming holds a second copy of its program's inputs (weights, KV cache) on the device while
it compiles: one starts only where the device's free memory holds every warming's inputs
twice over (`MEMORY_SHARE`), so a model sized to its GPU is never warmed, only compiled as
before. A warming is only a head start: one that fails or misses the cache costs nothing but
the wait for it.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from hetero.backends.eager import symbolic_dims, torch_device, traced_inputs
from hetero.backends.inductor import inductor_caches_on
from hetero.backends.library_ops import defining_modules
from hetero.backends.warming import Standby, Warming
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.partitioner.phases import Phase
from hetero.runtime.stage import StageSpec
from hetero.runtime.stage_compile import (
    CompileMode,
    contiguous_strides,
    row_major,
)

log = logging.getLogger("hetero.runtime")

# The module a warming process runs (`python -m`): runtime/stage_warm.py
WARM_MODULE = "hetero.runtime.stage_warm"
# Warmings on one device hold at most this share of its free memory (each holds a copy of
# its program's inputs), leaving the rest to the binding process's KV cache and activations.
MEMORY_SHARE = 0.5
# The modes the binder compiles a stage through InductorStage in (on a GPU only)
COMPILED = (CompileMode.STATIC, CompileMode.DYNAMIC)
# At most this many warmings per build: prefill's program and decode's (the decoder layers of
# a streamed phase share one); each compile spreads its kernels over Inductor's pool of
# workers, so more side by side would only share the same cores.
MOST = 2
# A model with this many parameters gets its standbys before its capture (as the measured
# choice's: runtime/choice.py); a smaller one compiles in seconds, less than their start-up.
STANDBY_PARAMS = 1_000_000


class StageWarmings:
    """The warmings of one generation build: `start(phase, stages)` after each phase's
    artifacts are written, `ready(stage, device, mode)` for the binder's compile to wait on,
    `close()` once the first request has compiled everything."""

    def __init__(
        self,
        run_mode: Callable[[Phase, StageSpec, Sequence[StageSpec]], CompileMode | None],
        device_of: Callable[[DeviceSpec], torch.device],
        *,
        standbys: Sequence[Standby] = (),
    ) -> None:
        """`run_mode` and `device_of`: the binder's (`StageBinder.run_mode`: how it will
        run each stage, decided there once); `standbys`: warming processes started ahead
        (while the model was captured), handed the first specs."""
        self.run_mode = run_mode
        self.device_of = device_of
        self._standbys = list(standbys)
        self._started: dict[str, tuple[Warming, torch.device, int]] = {}
        self._dir: tempfile.TemporaryDirectory | None = None

    def start(self, phase: Phase, stages: Sequence[StageSpec]) -> None:
        """Start a warming for each program of `phase` that the binder will compile with
        Inductor (`COMPILED`: on a GPU), one per program, while memory and `MOST` allow."""
        for s in stages:
            mode = self.run_mode(phase, s, stages)
            if mode not in COMPILED:
                continue
            dev = self.device_of(s.device)
            key = warming_key(s, dev, mode)
            if key in self._started:
                continue
            if len(self._started) >= MOST or not inductor_caches_on():
                return
            made = stage_spec(s, dev, mode)
            if made is None:
                continue
            spec, need = made
            if not self._fits(dev, need):
                log.info("%s: not warmed, its inputs (%.2f GB) would crowd %s", s.name,
                         need / 1e9, dev)  # fmt: skip
                continue
            path = self._workdir() / f"{len(self._started)}.json"
            path.write_text(json.dumps(spec))
            handed = self._standbys.pop(0).start([str(path)]) if self._standbys else None
            self._started[key] = (handed or Warming(WARM_MODULE, [str(path)]), dev, need)

    def ready(
        self, s: StageSpec, dev: torch.device, mode: CompileMode
    ) -> Callable[[], object] | None:
        """What the binder's compile of `s` calls before Inductor compiles: the wait for its
        warming; None where none was started."""
        running = self._started.get(warming_key(s, dev, mode))
        return running[0].wait if running is not None else None

    def close(self) -> None:
        """Stops warmings still running (their programs compiled without them) and standbys
        never handed work, and removes the specs."""
        for warming, _, _ in self._started.values():
            warming.cancel()
        for standby in self._standbys:
            standby.close()
        self._standbys.clear()
        if self._dir is not None:
            self._dir.cleanup()
            self._dir = None

    def _fits(self, dev: torch.device, need: int) -> bool:
        if dev.type != "cuda":
            return True
        free, _ = torch.cuda.mem_get_info(dev)
        held = sum(n for _, d, n in self._started.values() if d == dev)
        return held + need <= MEMORY_SHARE * free

    def _workdir(self) -> Path:
        if self._dir is None:
            self._dir = tempfile.TemporaryDirectory(prefix="hetero-warm-")
        return Path(self._dir.name)


def stand_by(cluster: ClusterSpec, model: torch.nn.Module) -> list[Standby]:
    """Warming processes for the first GPU of `cluster` this process sees, started before
    `model` is captured (the capture takes longer than their imports and the GPU's set-up):
    `MOST` of them, where Inductor's caches are on, the model is large enough to be
    worth it (`choice.early_standby`'s size) and small enough for a warming's copy of it to
    fit beside it; none otherwise. Ended by `StageWarmings.close`
    where no stage takes them."""
    gpus = [d for d in cluster.devices if d.kind == "gpu"]
    if not gpus or not torch.cuda.is_available() or not inductor_caches_on():
        return []
    dev = torch_device(gpus[0])
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        return []
    params = list(model.parameters())
    if sum(p.numel() for p in params) < STANDBY_PARAMS:
        return []
    # a warming holds about a phase's inputs, the model's size: none would start (`_fits`)
    size = sum(p.numel() * p.element_size() for p in params)
    free, _ = torch.cuda.mem_get_info(dev)
    later = 0 if params[0].device == dev else size  # the binder copies it there
    if size > MEMORY_SHARE * (free - later):
        return []
    return [Standby(WARM_MODULE, [str(dev)]) for _ in range(MOST)]


def warming_key(s: StageSpec, dev: torch.device, mode: CompileMode) -> str:
    """One warming per compiled program: stages with one artifact key share their program
    (every decoder layer's), as the binder's compiled modules do."""
    return f"{s.artifact.key}:{dev}:{mode.value}"


def stage_spec(s: StageSpec, dev: torch.device, mode: CompileMode) -> tuple[dict, int] | None:
    """(what runtime/stage_warm.py reads: the program's file, where it compiles, the sizes
    kept symbolic, each input's (shape, stride, dtype) as traced, a symbolic size at its
    traced example's value, and the modules to import before reading the program
    (backends/library_ops.py); the bytes those inputs take). None where an input is no tensor
    or a size has no example value (nothing to lay zeros out by)."""
    program = s.program
    if program is None:
        return None  # a cache hit: its compile reads the cache the build that wrote it left
    inputs = []
    nbytes = 0
    for val in traced_inputs(program):
        if not isinstance(val, torch.Tensor):
            return None
        shape = [_hint(x) for x in val.shape]
        stride = [_hint(x) for x in val.stride()]
        if None in shape or None in stride:
            return None
        if row_major(shape, stride):  # as the binder's call lays it out (`canonical_strides`)
            stride = list(contiguous_strides(shape))
        inputs.append([shape, stride, str(val.dtype).removeprefix("torch.")])
        if all(shape):  # the storage its strides span
            span = 1 + sum((n - 1) * st for n, st in zip(shape, stride, strict=True))
            nbytes += val.element_size() * span
    return {
        "program": str(Path(s.artifact.path) / "program.pt2"),
        "device": str(dev),
        "threads": torch.get_num_threads(),
        "name": s.name,
        "dynamic_dims": [list(d) for d in symbolic_dims(program)]
        if mode is CompileMode.DYNAMIC
        else [],
        "inputs": inputs,
        "imports": list(defining_modules(program.graph)),
    }, nbytes


def _hint(size: object) -> int | None:
    """A traced size's value: itself, or a symbol's example value."""
    if isinstance(size, int):
        return size
    node = getattr(size, "node", None)
    hint = getattr(node, "hint", None)
    return int(hint) if hint is not None else None
