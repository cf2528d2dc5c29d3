"""Generation in this process: prefill once, then one decode step per token, the KV cache
kept in place on the devices that run its layers.

Each device has one `DeviceStore`: the weights resident there (one copy, bound to both
phases' stages) and the state (each layer's cache, allocated once, updated in place by the
stages). A phase is a list of stages run by a `LocalExecutor` with runners bound here:

- resident stage: its program (torch.compile'd on a GPU) called with its activations, then
  its weights and state from the store; a decode stage on a GPU whose weights are all
  resident is captured as a CUDA graph (runtime/cuda_graph.py) and replayed per token;
- streamed stage: the same with its weights from the device's `WeightStreamer` (one item per
  stage, double-buffered, prefetched while the stage before runs);
- split stage: its GPU rows from the streamer, its CPU rows from host memory
  (runtime/split_linear.py).

The two phases' streamers on a device share their two GPU slots (the phases never run at
once); switching phase hands the slots over. After prefill, caches whose layer runs on
another device in decode are copied there once (GenerationPlan.moves).
"""

from __future__ import annotations

import abc
import contextlib
import logging
import numbers
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.backends.cpu_gemv import route_gemv
from hetero.backends.eager import relayout, symbolic_dims, torch_device, traced_layouts
from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm, host_to_device, overlapped
from hetero.backends.linear_fold import fold_linears
from hetero.backends.packed_linear import pack_linears, packable_dtypes
from hetero.backends.registry import BackendRegistry
from hetero.backends.reshape_views import reshape_views
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError
from hetero.partitioner.generation_plan import GenerationPlan
from hetero.partitioner.phases import PROMPT, START, LMGraphs, Phase
from hetero.partitioner.split import param_values
from hetero.runtime.artifacts import load_runner, verify_artifact
from hetero.runtime.cuda_graph import CudaGraphRunner, SlotGraphs
from hetero.runtime.executor import LocalExecutor
from hetero.runtime.host_pages import collapse
from hetero.runtime.measured_choice import MeasuredChoice, ProgramChoice
from hetero.runtime.metrics import MetricsSnapshot
from hetero.runtime.retype import bound_dtype, host_tensor
from hetero.runtime.sampling import Sampling, next_token, whole_number
from hetero.runtime.stage import StageSpec
from hetero.runtime.stage_compile import CompileMode, InductorStage, compile_mode, on_device
from hetero.runtime.stage_warming import StageWarmings
from hetero.runtime.streaming import program_key
from hetero.runtime.thread_choice import ThreadChoice, choose_threads
from hetero.runtime.weight_stream import WeightStreamer, slot_bytes

log = logging.getLogger("hetero.runtime")
# A split stage's program calls these ops: they must be registered before any program loads.
CUSTOM_OPS = (gpu_cpu_mm, gpu_cpu_mlp)


class DeviceStore:
    """One device's resident weights and state, shared by every stage placed there."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.weights: dict[str, torch.Tensor] = {}
        self.state: dict[str, torch.Tensor] = {}

    def weight(
        self, name: str, host: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The device's copy of weight `name` (its 16-bit floats in `dtype` where given: a
        device computes in one dtype, so one copy serves every stage there)."""
        if name not in self.weights:
            # detached: data, not a parameter (a copy that requires grad would also key
            # Inductor's cache otherwise than a warming's zeros: runtime/stage_warming.py)
            self.weights[name] = host_tensor(host, dtype).to(self.device).detach()
        return self.weights[name]

    def buffer(
        self, name: str, like: torch.Tensor, dtype: torch.dtype | None = None
    ) -> torch.Tensor:
        """The state tensor `name` (zeros the first time, shaped like `like`, typed like it
        or, for its 16-bit floats, in `dtype` where given: runtime/retype.py)."""
        if name not in self.state:
            self.state[name] = torch.zeros(
                like.shape, dtype=bound_dtype(like.dtype, dtype), device=self.device
            )
        return self.state[name]

    @property
    def nbytes(self) -> int:
        return sum(
            t.numel() * t.element_size() for t in (*self.weights.values(), *self.state.values())
        )


class BoundRunner:
    """A stage's program called with its activations, then its params bound per call, in
    torch.inference_mode: no op of a step records autograd state or bumps a version
    counter (a small LM's CPU decode dispatches ~300 ops per token: benchmarks/
    decode_ops_cpu.py, BENCHMARKS.md "generation stages in inference mode").
    What a step's ops make are inference tensors; buffers that outlive a step and are
    written outside one are made outside it (the stores at bind, the hand-offs' staging)."""

    def __init__(
        self,
        fn: Callable[..., Any],
        device: torch.device,
        fixed: Sequence[torch.Tensor | None],
        streamer: WeightStreamer | None = None,
        item: int = 0,
        streamed_at: Sequence[int] = (),
        *,
        host_reads: bool = True,
    ) -> None:
        self.fn = fn
        self.host_reads = host_reads
        # a program that reads host tensors itself (SlotGraphs: into its graph's buffers)
        self.fn_reads_host = host_reads and getattr(fn, "reads_host", False)
        self.device = device
        self.fixed = list(fixed)  # per param: its tensor, or None where the streamer gives it
        self.streamer = streamer
        self.item = item
        self.streamed_at = tuple(streamed_at)

    def __call__(self, *acts: Any) -> tuple:
        acts = tuple(self._here(k, a) for k, a in enumerate(acts))
        if self.streamer is None:
            with torch.inference_mode():
                return tuple(self.fn(*acts, *self.fixed))
        weights = self.streamer.acquire(self.item)
        try:
            params = list(self.fixed)
            for k, w in zip(self.streamed_at, weights, strict=True):
                params[k] = w
            with torch.inference_mode():
                return tuple(self.fn(*acts, *params))
        finally:
            self.streamer.release(self.item)

    def _here(self, k: int, a: Any) -> Any:
        if not isinstance(a, torch.Tensor) or a.device == self.device:
            return a
        if self.fn_reads_host and a.device.type == "cpu":
            return a
        if self.host_reads and a.device.type == "cpu" and self.device.type == "cuda":
            # a CPU stage's output: read by a kernel, not queued behind streaming weights
            return host_to_device(a, self.device, f"in{id(self)}:{k}")
        # to the host it waits: a non-blocking copy there lands in pinned memory after the
        # call returns, and the CPU stage would read it first (a step's ids from the GPU)
        return a.to(self.device, non_blocking=self.device.type != "cpu")


class Generation(abc.ABC):
    """The generation loop, whatever runs the steps: prefill (or a first decode step for a
    1-token prompt), the cache moves, then one decode step per token, sampling on the
    logits' device, stopping at EOS."""

    lm: LMGraphs
    plan: GenerationPlan

    def __init__(self, lm: LMGraphs, plan: GenerationPlan) -> None:
        self.lm = lm
        self.plan = plan
        self._lock = threading.Lock()
        self._closed = False
        self.last: dict[str, float] = {}
        # the last decode step's inputs: settle() times the step again on them
        self._last_decode: tuple[torch.Tensor, int] | None = None
        self.thread_choice: ThreadChoice | None = None

    @abc.abstractmethod
    def step(self, phase: Phase, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One program run: [batch, vocab] logits of the last position, on the device whose
        stage made them where that runs in this process (the next token is sampled there),
        on the host otherwise."""

    @abc.abstractmethod
    def move_state(self) -> None:
        """Copy the caches whose layer decodes elsewhere than it prefilled (plan.moves)."""

    @abc.abstractmethod
    def shutdown(self) -> None: ...

    @abc.abstractmethod
    def settle(self) -> None:
        """Choose now, by measurement, what this runtime can run two ways (a CPU decode
        program and its Inductor twin, the host team's width), so that the next request runs
        as later ones will; the runs measured before (and the trials) are forgotten."""

    def program_choices(self) -> tuple[ProgramChoice, ...]:
        """The host CPU decode programs `settle` chose by measurement (none before it)."""
        return ()

    @abc.abstractmethod
    def settle_programs(self, skip: Collection[str]) -> None:
        """Choose the host CPU decode programs by measurement among the candidates not in
        `skip` (on the last decode step's inputs), nothing else; a no-op where none are."""

    @abc.abstractmethod
    def measured(self, phase: Phase) -> tuple[Sequence[StageSpec], MetricsSnapshot]:
        """`phase`'s stages and the medians of their recent warm runs, as their workers
        measured them (what feedback folds into the cost model)."""

    def _choose_threads(
        self, current: Mapping[str, int], apply: Callable[[Mapping[str, int]], None]
    ) -> None:
        """Times the last decode step again at each candidate thread count of the host CPU
        teams that run decode stages (`current`: their counts now), and keeps the fastest
        (runtime/thread_choice.py). Nothing before a first decode step."""
        last = self._last_decode
        if last is None or not current:
            return
        ids, start = last

        def step() -> None:
            logits = self.step(Phase.DECODE, ids, start)
            if logits.device.type == "cuda":  # the step's wall time includes its GPU work
                torch.cuda.synchronize(logits.device)

        with self._lock:
            self.thread_choice = choose_threads(step, current, apply)

    def check(self, input_ids: Any, max_new_tokens: int) -> torch.Tensor:
        """The request as a [batch, length] int64 tensor, or ConfigError saying what is wrong."""
        if self._closed:
            raise ConfigError("this generator was shut down; compile the model again")
        if not whole_number(max_new_tokens):
            raise ConfigError(f"max_new_tokens={max_new_tokens!r}: give an integer, 1 or more")
        max_new_tokens = int(max_new_tokens)
        if max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens={max_new_tokens!r}: ask for at least 1 token")
        ids = _as_ids(input_ids)
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            raise ConfigError(f"input_ids must be integer token ids; got {ids.dtype}")
        ids = ids.to(torch.long)
        self.lm.check_prompt(ids, max_new_tokens)
        vocab = self.lm.vocab
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            i = int(bad.flatten().nonzero()[0])
            raise ConfigError(
                f"input_ids[{i // ids.shape[1]}, {i % ids.shape[1]}] = {int(ids.flatten()[i])} "
                f"is not a token id of this model (0 <= id < {vocab})"
            )
        return ids

    def generate_iter(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        sampling: Sampling = Sampling(),
    ) -> Iterator[torch.Tensor]:
        """Yields [batch] token ids as they come; sequences that met an EOS repeat it."""
        ids = self.check(input_ids, max_new_tokens)
        eos = eos_ids(eos_token_id)
        with self._lock:
            t0 = time.perf_counter()
            length = ids.shape[1]
            phase = Phase.PREFILL if length >= 2 else Phase.DECODE
            logits = self.step(phase, ids, 0)
            if phase is Phase.DECODE:
                self._last_decode = (ids, 0)
            if phase is Phase.PREFILL:
                self.move_state()
            gen = sampling.generator(logits.device)
            token = next_token(logits, sampling, gen)
            # Where the logits come back on a GPU, its step runs after the call returns: the
            # next step is queued before this token is read, so the GPU runs it while the
            # host copies the token and the caller takes it (a read first left the GPU idle
            # through the copy, the caller's work and the next launch, every token). A step
            # run on the host is done when it returns: queued first, it would only hold
            # each token back by a step.
            ahead = runs_after_return(token.device)
            eos_host = torch.tensor(sorted(eos), dtype=torch.long)
            eos_ids_t = eos_host.to(token.device) if eos else None
            done = torch.zeros(token.shape, dtype=torch.bool, device=token.device)
            done_here = torch.zeros(token.shape, dtype=torch.bool)  # read without a wait
            first = time.perf_counter()
            self.last = {"ttft_ms": (first - t0) * 1e3, "tokens": 1}
            for k in range(max_new_tokens):
                nxt = None
                if ahead and k < max_new_tokens - 1:
                    nxt, done = self._next(token, length + k, done, sampling, gen, eos_ids_t)
                out = token.cpu()
                yield out
                if eos:
                    done_here |= torch.isin(out, eos_host)
                    if bool(done_here.all()):
                        break  # a step queued ahead is dropped: its cache row lies past the end
                if k == max_new_tokens - 1:
                    break
                if nxt is None:
                    nxt, done = self._next(token, length + k, done, sampling, gen, eos_ids_t)
                token = nxt
                self.last["tokens"] = k + 2
            end = time.perf_counter()
            n = self.last["tokens"]
            self.last["decode_ms_per_token"] = (end - first) * 1e3 / max(1, n - 1)

    def _next(
        self,
        token: torch.Tensor,
        start: int,
        done: torch.Tensor,
        sampling: Sampling,
        gen: torch.Generator | None,
        eos: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the token after `token`, which sequences met an EOS up to `token`), from one
        decode step at `start`; nothing waits for the device. A sequence that met an EOS
        repeats the smallest EOS id."""
        last = (token.view(-1, 1).to(torch.long), start)
        logits = self.step(Phase.DECODE, *last)
        self._last_decode = last
        nxt = next_token(logits, sampling, gen)
        if eos is None:
            return nxt, done
        done = done | torch.isin(token, eos)
        return torch.where(done, eos[0], nxt), done

    def generate(
        self,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        *,
        eos_token_id: int | Sequence[int] | None = None,
        sampling: Sampling = Sampling(),
    ) -> torch.Tensor:
        """[batch, new tokens] ids (fewer than max_new_tokens when every sequence met EOS)."""
        tokens = list(
            self.generate_iter(
                input_ids, max_new_tokens, eos_token_id=eos_token_id, sampling=sampling
            )
        )
        return torch.stack(tokens, dim=1)


_HOST = "host"


def runs_after_return(device: torch.device) -> bool:
    """Whether work queued on `device` may still run after the call that queued it returns."""
    return device.type == "cuda"


@contextlib.contextmanager
def team_width(threads: int | None) -> Iterator[None]:
    """This thread's OpenMP team `threads` wide inside (None: as it is), as it was after: a
    generation's choice is for its host CPU's decode stages, not for the rest of the
    caller's process. torch keeps a count per thread (a request thread that ran torch before
    the choice has its old team), so every call sets it."""
    before = torch.get_num_threads()
    if threads is None or threads == before:
        yield
        return
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _host(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu() if t.device.type != "cpu" else t.detach()


class StageBinder:
    """Builds the runners of generation stages (any subset: all of them in this process, or
    one device's in a Ray worker) over per-device stores, and hands each device's streaming
    slots to the phase that runs."""

    def __init__(
        self,
        registry: BackendRegistry,
        *,
        device_of: Callable[[DeviceSpec], torch.device] | None = None,
        compile_gpu: bool = True,
        compile_cpu: bool = True,
        cuda_graphs: bool = True,
        host_reads: bool = True,
        graph_streamed: bool = True,
        overlap_handoffs: bool = True,
    ) -> None:
        """`device_of`: where this process runs a plan device (default: the device itself;
        tests map a GPU to the CPU). `compile_gpu`: torch.compile GPU stages (Inductor).
        `compile_cpu`: a CPU decode stage may also run Inductor's program: op by op serves
        until `settle()` (a feedback round) measures both (`CompileMode.MEASURED`).
        `cuda_graphs`: replay all-resident decode stages on a GPU as CUDA graphs.
        `host_reads`: a GPU stage reads a CPU stage's outputs from pinned host memory
        (backends.gpu_cpu_mm.host_to_device) instead of copying them (False: for
        comparisons). `graph_streamed`: also replay streamed decode stages as CUDA graphs, one
        per streaming slot (runtime/cuda_graph.SlotGraphs): a streamed layer's step was bound
        by the launching thread (an H100 host, BENCHMARKS.md run 38: 159.6 ms per token
        launched, 119.9 replayed, the same stages in one process). Split stages, whose GPU
        rows stream too, stay launched: their hand-offs wait on the host, which no capture can
        hold (run 39 captured them: a failed capture, a GPU generator left capturing). False:
        launched, for comparisons.
        `overlap_handoffs`: a split layer's hand-off queues the CPU's share and returns, so
        the launching thread goes on while the CPU multiplies (backends.gpu_cpu_mm
        `overlapped`; False: the thread waits and multiplies itself, for comparisons)."""
        self.registry = registry
        self.overlap_handoffs = overlap_handoffs
        self.graph_streamed = graph_streamed
        self._graph_pool: Any = None
        self.device_of = device_of or torch_device
        self.compile_gpu = compile_gpu
        self.compile_cpu = compile_cpu
        self.choices: dict[str, MeasuredChoice] = {}  # stage name -> its measured programs
        # Inductor's compiles of the stages bound next, started elsewhere by the build
        self.warmings: StageWarmings | None = None
        self.cuda_graphs = cuda_graphs
        self.host_reads = host_reads
        self.stores: dict[str, DeviceStore] = {}
        self.streamers: dict[Phase, dict[str, WeightStreamer]] = {}
        self._active: Phase | None = None
        # the width of the OpenMP team the host CPU's decode stages run on: None, the
        # calling thread's own (until a settle chooses: runtime/thread_choice.py)
        self.decode_threads: int | None = None

    def bind(
        self, stages: Mapping[Phase, Sequence[StageSpec]], weights: Mapping[str, torch.Tensor]
    ) -> dict[Phase, dict[int, Any]]:
        """Phase -> stage index -> runner (activations in, outputs out). `weights`: every
        parameter and state buffer the stages take, by name (the captured program's values,
        on whatever device the model is); each lands on its stage's device once."""
        self.weights = weights
        self._cpu_rows: list[torch.Tensor] = []
        prepared = {phase: self._prepare(phase, tuple(stages.get(phase, ()))) for phase in Phase}
        self._huge_pages()
        shared = self._shared_slots(prepared)
        return {
            phase: self._finish(phase, tuple(stages.get(phase, ())), *prepared[phase], shared)
            for phase in Phase
        }

    def settle(self, skip: Collection[str] = ()) -> None:
        """Makes every measured choice of the programs bound here (`CompileMode.MEASURED`);
        `skip`: candidates not tried (`NO_COMPILE`: only those that run at once)."""
        with torch.inference_mode():  # as the steps run: the compiled guards check it
            for choice in self.choices.values():
                choice.settle(skip)

    def program_choices(self) -> tuple[ProgramChoice, ...]:
        """The measured choices made so far, by the first stage of each shared program."""
        made = (c.made() for c in self.choices.values())
        return tuple(c for c in made if c is not None)

    def release(self) -> None:
        """Drop everything this binder holds on its devices and pinned in host memory: the
        stores (weights, KV cache), the streamers (their GPU slots and pinned weight copies),
        the CUDA graphs' pool. A generation rebuilt after a feedback round binds again while
        the old one is still referenced; holding its slots then put the compile 0.4 GiB over
        a 4 GiB cap (run 14), and its pinned copies doubled the streamed weights in RAM."""
        self.stores.clear()
        self.streamers.clear()
        self.weights = {}
        self._graph_pool = None
        self._active = None

    def enter(self, phase: Phase) -> None:
        """Make `phase` the one using the shared streaming slots."""
        if self._active is not phase:
            for st in self.streamers.get(phase, {}).values():
                st.adopt()
                st.prefetch(0)
            self._active = phase

    def read_state(self, device: str, names: Sequence[str]) -> dict[str, torch.Tensor]:
        store = self.stores.get(device)
        return {n: store.state[n] for n in names if store is not None and n in store.state}

    def write_state(self, device: str, values: Mapping[str, torch.Tensor]) -> None:
        store = self.stores.get(device)
        for n, v in values.items():
            if store is not None and n in store.state:
                store.state[n].copy_(v, non_blocking=True)

    # ---- loading -------------------------------------------------------------------------------
    def _store(self, device: DeviceSpec) -> DeviceStore:
        if device.name not in self.stores:
            self.stores[device.name] = DeviceStore(self.device_of(device))
        return self.stores[device.name]

    def _prepare(self, phase: Phase, stages: tuple[StageSpec, ...]):
        """Per stage: its runner, or (program, device, bound params, where streamed ones go);
        and per device, the streamed items in stage order."""
        streamed: dict[str, list[tuple[StageSpec, dict[str, torch.Tensor]]]] = {}
        runners: dict[int, Any] = {}
        compiled: dict[str, Any] = {}
        for s in stages:
            store = self._store(s.device)
            dev = store.device
            mode = self.run_mode(phase, s, stages)
            if mode is None:
                # weights inside the artifact (TVM): the backend's own runner
                runners[s.index] = load_runner(s.artifact, s.device, self.registry)
                continue
            values = self._values(s)
            fn = self._compiled(s, dev, phase, compiled, mode)
            fixed: list[torch.Tensor | None] = []
            moving: dict[str, torch.Tensor] = {}
            # a CPU partition computing in another dtype binds its weights and state in it
            retype = getattr(torch, s.cpu_dtype) if s.cpu_dtype and not s.shares else None
            for name in s.params:
                if name in s.state:
                    fixed.append(store.buffer(name, values[name], retype))
                elif name in s.cpu_shares:
                    fixed.append(values[name])  # the CPU's rows stay in host memory
                    self._cpu_rows.append(values[name])
                elif s.weights == "resident":
                    fixed.append(store.weight(name, values[name], retype))
                else:
                    fixed.append(None)
                    moving[name] = _host(values[name])
            if moving:
                streamed.setdefault(s.device.name, []).append((s, moving))
            runners[s.index] = (fn, dev, fixed, [k for k, t in enumerate(fixed) if t is None])
        return runners, streamed

    def _huge_pages(self) -> None:
        """The weights the host CPU reads every step, re-backed by huge pages in place
        (runtime/host_pages.py: why, and where it cannot)."""
        host = [
            t
            for store in self.stores.values()
            if store.device.type == "cpu"
            for t in store.weights.values()
        ]
        t0 = time.perf_counter()
        moved = collapse([*host, *self._cpu_rows])
        if moved:
            log.info(
                "%.2f GB of the host CPU's weights in huge pages (%.1f s)",
                moved / 1e9,
                time.perf_counter() - t0,
            )

    def _values(self, s: StageSpec) -> dict[str, torch.Tensor]:
        """The stage's params by name; a split stage's shares cut from the full weights."""
        out = {n: self.weights[n] for n in s.params if n in self.weights}
        cpu_dtype = getattr(torch, s.cpu_dtype) if s.cpu_dtype else None
        for k, group in enumerate(s.shares):
            full = {w: _host(self.weights[w]) for w in group.weights}
            out[f"gpu{k}"], out[f"cpu{k}"] = group.cut(full, cpu_dtype)
        return out

    def _shared_slots(self, prepared) -> dict[str, tuple[list[torch.Tensor], Any]]:
        """Per device that streams: two slots as large as either phase needs, and one copy
        stream, for both phases' streamers (the phases never run at once)."""
        need: dict[str, int] = {}
        for _, streamed in prepared.values():
            for name, items in streamed.items():
                need[name] = max(need.get(name, 0), slot_bytes([w for _, w in items]))
        out = {}
        for name, size in need.items():
            dev = self.stores[name].device
            if dev.type != "cuda":
                continue
            buffers = [torch.empty(max(size, 1), dtype=torch.uint8, device=dev) for _ in range(2)]
            out[name] = (buffers, torch.cuda.Stream(dev))
        return out

    def _finish(self, phase, stages, runners, streamed, shared) -> dict[int, Any]:
        streamers: dict[str, WeightStreamer] = {}
        for name, items in streamed.items():
            dev = self.stores[name].device
            buffers, stream = shared.get(name, (None, None))
            streamer = WeightStreamer(
                [w for _, w in items], dev, slots=2, buffers=buffers, stream=stream
            )
            streamers[name] = streamer
            for k, (s, _) in enumerate(items):
                fn, d, fixed, at = runners[s.index]
                # not a split stage: its hand-offs wait on the host, which no capture can hold
                # (a failed capture leaves what it allocated in the graphs' pool)
                graphed = self.graph_streamed and s.weights == "streamed"
                if phase is Phase.DECODE and d.type == "cuda" and graphed:
                    fn = SlotGraphs(fn, d, len(s.inputs), pool=self._pool())
                runners[s.index] = BoundRunner(
                    fn, d, fixed, streamer, k, at, host_reads=self.host_reads
                )
        for s in stages:
            r = runners[s.index]
            if isinstance(r, tuple):
                fn, d, fixed, _ = r
                r = BoundRunner(fn, d, fixed, host_reads=self.host_reads)
                if phase is Phase.DECODE and d.type == "cuda" and self.cuda_graphs:
                    r = CudaGraphRunner(r, d, host_reads=self.host_reads, pool=self._pool())
                runners[s.index] = r
            if phase is Phase.DECODE and self.stores[s.device.name].device.type == "cpu":
                runners[s.index] = _OnDecodeTeam(runners[s.index], self)
        self.streamers[phase] = streamers
        return runners

    def _pool(self) -> Any:
        """One CUDA graph memory pool for every graph this binder captures."""
        if self._graph_pool is None:
            self._graph_pool = torch.cuda.graph_pool_handle()
        return self._graph_pool

    def run_mode(
        self, phase: Phase, s: StageSpec, stages: Sequence[StageSpec]
    ) -> CompileMode | None:
        """How this binder runs stage `s` of `phase` (among `stages`): its program compiled
        with Inductor on a GPU as the phase asks (`compile_mode`), a host CPU's decode
        measured against op by op, op by op otherwise (a GPU or NPU that tests map to this
        CPU: those stages stand for other devices); None where the backend keeps no state
        (its weights inside the artifact: its own runner)."""
        if not getattr(self.registry.get(s.backend), "holds_state", False):
            return None
        mode = compile_mode(phase, s, stages)
        if self.device_of(s.device).type == "cuda":
            return mode if self.compile_gpu else CompileMode.OP_BY_OP
        if mode is CompileMode.STATIC and self.compile_cpu and s.device.kind == "cpu":
            return CompileMode.MEASURED
        return CompileMode.OP_BY_OP

    def _compiled(
        self, s: StageSpec, dev: torch.device, phase: Phase, cache: dict, mode: CompileMode
    ) -> Any:
        """The stage's program as `run_mode` says (stages with the same program and mode
        share one module: every decoder layer)."""
        # Equal artifact keys are equal programs (every decoder layer's, its weights bound
        # here): deserialising one took ~2 s on the 7B's host, ~60 times per build before.
        by_artifact = f"artifact:{s.artifact.key}:{phase.value}:{dev}:{mode.value}"
        if by_artifact in cache:
            return cache[by_artifact]
        if s.program is not None:  # built by this process: the file holds the same program
            program = s.program
        else:
            verify_artifact(s.artifact)
            # torch.export.load reads a program; it never unpickles code.
            program = torch.export.load(Path(s.artifact.path) / "program.pt2")
        key = f"{program_key(program)}:{phase.value}:{dev}:{mode.value}"
        if key not in cache:
            if mode in (CompileMode.OP_BY_OP, CompileMode.MEASURED):
                mod = _op_by_op(program, dev)
            else:
                mod = on_device(program, dev)
            if mode is CompileMode.MEASURED:
                inductor = InductorStage(mod, dynamic_dims=(), name=s.name)
                candidates = [("op-by-op", mod), ("inductor", inductor)]
                dtypes = packable_dtypes()
                packed = _op_by_op(program, dev) if dtypes else None
                if packed is not None and pack_linears(packed, dtypes):
                    candidates.append(("onednn-packed", packed))  # weights packed once
                routed = _op_by_op(program, dev)
                if route_gemv(routed):  # 16-bit weights: hetero's matrix-vector kernel
                    candidates.append(("gemv", routed))
                    candidates.append(
                        ("inductor-gemv", InductorStage(routed, dynamic_dims=(), name=s.name))
                    )
                mod = MeasuredChoice(candidates, name=s.name)
                self.choices[s.name] = mod
            elif mode is not CompileMode.OP_BY_OP:
                dims = symbolic_dims(program) if mode is CompileMode.DYNAMIC else ()
                ready = self.warmings.ready(s, dev, mode) if self.warmings else None
                mod = InductorStage(mod, dynamic_dims=dims, name=s.name, ready=ready)
            layouts = traced_layouts(program)[: len(s.inputs)]
            if any(x is not None for x in layouts):
                mod = _Relaid(mod, layouts)
            cache[key] = mod
        cache[by_artifact] = cache[key]
        return cache[key]


def _op_by_op(program: Any, dev: torch.device) -> torch.fx.GraphModule:
    """`program` as a module run op by op on `dev`, each Linear one call."""
    mod = on_device(program, dev)
    fold_linears(mod)  # a dispatch per Linear instead of four
    reshape_views(mod)  # the GPU's attention may lay its output out otherwise
    return mod


def _as_ids(input_ids: Any) -> torch.Tensor:
    """`input_ids` (a tensor, an array, a list of token-id lists) as a tensor, or ConfigError
    saying what it is instead."""
    if input_ids is None or isinstance(input_ids, str | bytes):
        raise ConfigError(
            f"input_ids must be token ids ([batch, length]: a tensor, an array or a list of "
            f"lists of ints); got {type(input_ids).__name__}. What to do: tokenize the text first"
        )
    try:
        return torch.as_tensor(input_ids)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ConfigError(
            f"input_ids must be [batch, length] token ids, every row as long as the others "
            f"(pad them, or send them one at a time); torch could not read them: {e}"
        ) from None


def eos_ids(eos_token_id: Any) -> set[int]:
    """The EOS ids as a set (None: none), or ConfigError naming a value that is not one."""
    if eos_token_id is None:
        return set()
    if isinstance(eos_token_id, torch.Tensor):
        eos_token_id = eos_token_id.flatten().tolist()
    items = [eos_token_id] if isinstance(eos_token_id, numbers.Integral) else eos_token_id
    try:
        items = list(items)
    except TypeError:
        items = [items]
    bad = [e for e in items if not whole_number(e) or e < 0]
    if bad:
        raise ConfigError(
            f"eos_token_id={eos_token_id!r}: {bad[0]!r} is not a token id (a non-negative "
            "integer); give an int, a list of them, or None"
        )
    return {int(e) for e in items}


class _OnDecodeTeam:
    """A host CPU's decode stage run by an OpenMP team `binder.decode_threads` wide, the
    caller's team as it was after. Only these stages: a GPU stage's compiled program would
    recompile at another width (Dynamo guards on the thread count) and gains nothing."""

    def __init__(self, runner: Any, binder: StageBinder) -> None:
        self.runner = runner
        self.binder = binder

    def __call__(self, *args: Any) -> Any:
        with team_width(self.binder.decode_threads):
            return self.runner(*args)

    def __getattr__(self, name: str) -> Any:  # the runner's own (gpu_timed, ...)
        return getattr(self.runner, name)


# The CPU decode candidates that compile on their first call (Inductor's: ~18 s cold on the
# 2-core box): what a generation compiled without feedback rounds does not try, so that its
# compile measures only programs that run at once (op by op, oneDNN on packed weights,
# hetero::gemv).
NO_COMPILE = ("inductor", "inductor-gemv")


class _Relaid:
    """A program whose activations are first put in the memory layout it was traced with
    (`backends.eager.relayout`: a copy only where a value arrives otherwise, as TVM's dense
    outputs of a permuted view do)."""

    def __init__(self, fn: Any, layouts: Sequence[tuple[int, ...] | None]) -> None:
        self.fn = fn
        self.layouts = tuple(layouts)

    def __call__(self, *args: Any) -> Any:
        n = len(self.layouts)
        acts = [
            relayout(a, o) if isinstance(a, torch.Tensor) else a
            for a, o in zip(args[:n], self.layouts, strict=False)
        ]
        return self.fn(*acts, *args[n:])


def lm_weights(lm: LMGraphs) -> dict[str, torch.Tensor]:
    """Every parameter and state buffer of both phases by placeholder name (the model's own
    tensors: the two programs share them)."""
    return {**param_values(lm.prefill), **param_values(lm.decode)}


class LocalGeneration(Generation):
    """Both phases' stages loaded in this process; `generate()` runs a request."""

    def __init__(
        self,
        lm: LMGraphs,
        plan: GenerationPlan,
        stages: Mapping[Phase, Sequence[StageSpec]],
        binder: StageBinder,
    ) -> None:
        super().__init__(lm, plan)
        self.binder = binder
        self.stages = stages
        runners = binder.bind(stages, lm_weights(lm))
        self.executors = {
            phase: LocalExecutor(
                tuple(stages[phase]),
                tuple(o for o in lm.graph(phase).outputs if o),
                runners=runners[phase],
                gpu_timing=True,
                outputs_where_made=True,
            )
            for phase in Phase
        }

    @property
    def stores(self) -> dict[str, DeviceStore]:
        return self.binder.stores

    @property
    def decode_threads(self) -> int | None:
        """The host CPU decode stages' team width (None: the caller's own, until settle()
        chooses; a benchmark may set it to compare)."""
        return self.binder.decode_threads

    @decode_threads.setter
    def decode_threads(self, threads: int | None) -> None:
        self.binder.decode_threads = threads

    def step(self, phase: Phase, ids: torch.Tensor, start: int) -> torch.Tensor:
        """One program run: [batch, vocab] logits of the last position."""
        self.binder.enter(phase)
        inputs = {PROMPT: ids, START: torch.tensor(start, dtype=torch.long)}
        with overlapped() if self.binder.overlap_handoffs else contextlib.nullcontext():
            out = self.executors[phase].run(inputs)
        return next(iter(out.values()))

    def move_state(self) -> None:
        for move in self.plan.moves:
            self.binder.write_state(move.dst, self.binder.read_state(move.src, move.state))

    def settle(self) -> None:
        self.binder.settle()
        on_host = any(
            self.binder.device_of(s.device).type == "cpu" for s in self.stages[Phase.DECODE]
        )
        if on_host:  # every host stage here runs on the calling thread's OpenMP team

            def apply(threads: Mapping[str, int]) -> None:
                self.binder.decode_threads = threads[_HOST]

            self._choose_threads({_HOST: torch.get_num_threads()}, apply)
        for executor in self.executors.values():  # the trials ran other programs and widths
            executor.metrics.forget_runs()

    def program_choices(self) -> tuple[ProgramChoice, ...]:
        return self.binder.program_choices()

    def settle_programs(self, skip: Collection[str]) -> None:
        self.binder.settle(skip)
        for executor in self.executors.values():  # the trials ran other programs
            executor.metrics.forget_runs()

    def measured(self, phase: Phase) -> tuple[Sequence[StageSpec], MetricsSnapshot]:
        executor = self.executors[phase]
        return executor.stages, executor.metrics.snapshot()

    def shutdown(self) -> None:
        self._closed = True
        self.executors.clear()
        self.binder.release()
