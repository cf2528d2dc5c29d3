"""`hetero::gpu_cpu_mm`: one matmul computed by a GPU and its host CPU at once, each on its
share of the weight's rows (the `split` placement, partitioner/gpu_cpu_split.py); and
`hetero::gpu_cpu_mlp`: a whole MLP block split the same way by its intermediate features,
one hand-off where the matmuls one at a time took two.

Custom ops rather than Python in a graph: a compiler sees one opaque call with known output
shapes and fuses the rest of the program around it; torch.export records it as one node.
Importing this module registers the ops.

They are registered through `torch.library.Library` (a kernel per dispatch key) rather than
`torch.library.custom_op`: custom_op's Python autograd and dispatch layers cost ~9 us more
per call on the 2-core CPU box (a tiny gpu_cpu_mm: 19.4-20.1 us through custom_op, 10.2-10.7
us now, 8.6-9.1 us for the bare function; `benchmarks/custom_op_dispatch.py`), paid by every
hand-off of every split layer per token, and these ops are never differentiated.

The CPU's rows come back to the GPU without the copy engine: a split layer streams its GPU
rows over the link on a side stream, and the copy engine serves copies in the order they were
queued, so a 13 KB result copied back waited for the whole layer in flight (3.2 ms measured
on an H200, against 0.013 ms alone; `benchmarks/split_layer_gpu.py`). The GPU reads the
result straight from pinned host memory instead (a kernel's loads, which the copy engine
does not order).

Inside `overlapped()` (a generation's steps) a hand-off does not stop the thread that
launches the GPU's work: it queues the CPU's share as a task for a TorchScript thread (no
Python lock, so it multiplies while this thread goes on launching the rest of the step), and
the GPU stream waits on a flag in pinned memory that the task sets when its rows are written
(backends/stream_flags.py). Where either piece is missing the hand-off runs as before, in this
thread, waiting for its copy.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from hetero.backends.stream_flags import StreamFlags
from hetero.errors import WorkerError

log = logging.getLogger(__name__)


class _Staging(threading.local):
    """One pinned host buffer per (device, role) for every call of one thread, with the same
    bytes seen as a CUDA tensor: pinning per call costs more than the hand-off's copies, a
    buffer the GPU reads directly must outlive the read (a freed caching-allocator block
    does not), and making the CUDA view per call cost ~60 us. A buffer grows (doubling) to
    the largest product asked of it, so varying prompt lengths do not pin memory per length.

    Reuse is safe because each call waits for its device's stream to reach the call's own
    copy before it writes either buffer (or drops a smaller one), and every earlier read of
    them sits before that on the same stream."""

    def __init__(self) -> None:
        self.buffers: dict[tuple[torch.device, str], tuple[torch.Tensor, torch.Tensor | None]] = {}
        # per (device, role, shape, dtype): the views `get` returned for them
        self.views: dict[tuple, tuple[torch.Tensor, torch.Tensor | None]] = {}
        # host_to_device's roles: an event past the last kernel that read each buffer
        self.reads: dict[tuple[torch.device, str], torch.cuda.Event] = {}
        # overlapped(): how deep, and per device the queue of hand-offs in flight
        self.depth = 0
        self.chains: dict[torch.device, _Chain | None] = {}
        # buffers replaced while overlapped hand-offs may still read them: kept to the drain
        self.retired: list[tuple[torch.Tensor, torch.Tensor | None]] = []

    def get(
        self, device: torch.device, role: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pinned buffer as `shape`/`dtype`, the same bytes on `device` or None where
        the GPU cannot read host memory)."""
        views = self.views.get((device, role, shape, dtype))
        if views is not None:  # four view ops less per call: ~10 us of a decode hand-off
            return views
        # Normal tensors even when first asked for inside torch.inference_mode (generation's
        # stages run there): the buffers outlive the call, and a hand-off's task writes them
        # from its own thread, which is not in inference mode.
        with torch.inference_mode(False):
            nbytes = math.prod(shape) * dtype.itemsize
            got = self.buffers.get((device, role))
            if got is None or got[0].numel() < nbytes:
                size = max(nbytes, 2 * got[0].numel() if got is not None else 1)
                if got is not None and self.depth:
                    self.retired.append(got)
                host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
                got = (host, _device_view(host, device))
                self.buffers[(device, role)] = got
                self.views = {k: v for k, v in self.views.items() if k[:2] != (device, role)}
            host, dev = got
            mine = host[:nbytes].view(dtype).view(shape)
            views = (mine, None if dev is None else dev[:nbytes].view(dtype).view(shape))
        self.views[(device, role, shape, dtype)] = views
        return views

    def chain(self, device: torch.device) -> _Chain | None:
        """The overlapped hand-offs' queue for `device` inside `overlapped()`, else None (also
        where the driver's stream flags or TorchScript are missing, and while a CUDA graph
        is being captured: a task queued at capture would run once, not at each replay)."""
        if not self.depth or torch.cuda.is_current_stream_capturing():
            return None
        if device not in self.chains:
            flags, tasks = StreamFlags.load(), _tasks()
            with torch.inference_mode(False):  # its flags are written from the task thread
                self.chains[device] = (
                    _Chain(device, flags, tasks, self) if flags is not None and tasks else None
                )
        return self.chains[device]


_STAGING = _Staging()


# One overlapped block at a time in a process. Two threads' blocks could otherwise deadlock:
# their tasks share one inter-op thread (_one_task_thread), and on a shared CUDA stream one
# thread's flag write can queue behind the other's wait for a task that cannot start while
# the first thread's task spins for that write.
_OVERLAP = threading.Lock()


@contextlib.contextmanager
def overlapped() -> Iterator[None]:
    """Split ops called inside (in this thread) hand the CPU's share to a task and go on;
    leaving waits for every task and raises `WorkerError` if one failed. A generation's
    steps run inside it (runtime/generation.py); other threads' blocks wait their turn."""
    if not _STAGING.depth:
        _OVERLAP.acquire()
    _STAGING.depth += 1
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _STAGING.depth -= 1
        if not _STAGING.depth:
            try:
                chains = [c for c in _STAGING.chains.values() if c is not None]
                for c in chains:
                    c.drain(raise_failure=not failed)
                _STAGING.retired.clear()
            finally:
                _OVERLAP.release()


class HandoffClock:
    """Times the overlapped hand-offs of one stage's run on the GPU's timeline: an event
    when x's flag is written, another when the stream's wait for the CPU's rows ends. The
    span is the CPU's share as the step ran it (the task's pickup and its product; the
    GPU's own share runs inside it and is the shorter on a split layer the CPU bounds).
    The calibrated rate is measured with nothing else running; in a step the launching
    thread, the link and the driver share the host (H100 hosts' split MLP rows ran at 80%
    and 68% of it, BENCHMARKS.md runs 34 and 36), and the stage's time alone cannot say
    whether its overrun is the CPU's or the hand-offs'. Events are made once and reused."""

    def __init__(self) -> None:
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._used = 0
        self._chain: _Chain | None = None

    def start(self, device: torch.device) -> bool:
        """Times the hand-offs this thread makes on `device` until `stop()`; False (nothing
        timed) outside `overlapped()`, where hand-offs run synchronously, and before this
        thread's first hand-off on `device` (a plan without split layers never starts the
        task thread for a clock; a stage's first run is a cold one anyway). Called for every
        GPU stage run, so no CUDA call here: hand-offs made while a CUDA graph is captured
        bypass the chain (`_Staging.chain`), so they are never timed."""
        self._used = 0
        chain = _STAGING.chains.get(device) if _STAGING.depth else None
        if chain is None:
            return False
        chain.clock, self._chain = self, chain
        return True

    def stop(self) -> None:
        if self._chain is not None and self._chain.clock is self:
            self._chain.clock = None
        self._chain = None

    def pair(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        if self._used == len(self._events):
            self._events.append(
                (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            )
        self._used += 1
        return self._events[self._used - 1]

    def spans(self) -> list[float]:
        """Each hand-off's span (ms) in the order the run made them (its stream synchronised
        first by the caller)."""
        return [a.elapsed_time(b) for a, b in self._events[: self._used]]

    def ms(self) -> float | None:
        """The run's hand-offs' spans summed; None where it made none."""
        return sum(self.spans()) if self._used else None


class _ArrayInterface:
    """A pinned host byte buffer as a CUDA array (`__cuda_array_interface__`): with unified
    addressing a pinned buffer's host address is valid on the device, so kernels given the
    view read host memory over the link."""

    def __init__(self, t: torch.Tensor) -> None:
        self.__cuda_array_interface__ = {
            "shape": (t.numel(),),
            "typestr": "|u1",
            "data": (t.data_ptr(), False),
            "version": 2,
            "strides": None,
        }


def _device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """`host` (pinned bytes) as a tensor on `device` that aliases it, or None (warned)."""
    try:
        view = torch.as_tensor(_ArrayInterface(host), device=device)
    except (RuntimeError, TypeError, ValueError) as e:
        view = None
        reason = str(e)
    else:
        if view.data_ptr() == host.data_ptr():
            return view
        reason = "torch copied the buffer instead of aliasing it"
    warnings.warn(
        f"gpu_cpu_mm: the GPU cannot read pinned host memory here ({reason}); the CPU's "
        "rows come back by copy, behind any weights streaming on the copy engine",
        RuntimeWarning,
        stacklevel=3,
    )
    return None


def from_host(
    y_host: torch.Tensor, y_dev: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """The pinned `y_host` on `device` in `dtype`: read by a kernel through `y_dev` (its
    alias there) rather than copied, so it does not queue behind streaming weights."""
    if y_dev is None:
        y = y_host.to(device, non_blocking=True)
        return y if y.dtype == dtype else y.to(dtype)
    # an elementwise kernel (a same-dtype copy_ would go to the copy engine's queue)
    return y_dev.to(dtype) if y_dev.dtype != dtype else y_dev.mul(1)


def host_to_device(
    t: torch.Tensor, device: torch.device, role: str, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The host tensor `t` on the GPU `device` (into `out` where given), read there by a
    kernel from a pinned buffer rather than copied: an activation a CPU stage hands to a
    GPU stage would otherwise wait behind the weights streaming on the copy engine (a whole
    layer's, milliseconds). `role` names the buffer (one per stage input): it is rewritten
    only once the kernel that read it last has run."""
    done = _STAGING.reads.pop((device, role), None)
    if done is not None:
        done.synchronize()  # before `get`, which may also drop the buffer for a larger one
    host, dev = (
        _STAGING.get(device, role, tuple(t.shape), t.dtype)
        if device.type == "cuda" and t.dtype != torch.bool
        else (None, None)
    )
    if dev is None:  # no GPU, or one that cannot read host memory: a copy
        return t.to(device, non_blocking=True) if out is None else out.copy_(t, non_blocking=True)
    host.copy_(t)
    y = dev.mul(1) if out is None else torch.mul(dev, 1, out=out)
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(device))
    _STAGING.reads[(device, role)] = ev
    return y


_LIB = torch.library.Library("hetero", "FRAGMENT")


def _register(schema: str, kernel: Callable, fake: Callable) -> torch._ops.OpOverload:
    """Defines `hetero::<schema>` with `kernel` for CPU and CUDA inputs (it tells them apart
    itself) and `fake` for tracing; returns the op a graph calls."""
    name = schema.split("(", 1)[0]
    _LIB.define(schema)
    for key in ("CPU", "CUDA"):
        _LIB.impl(name, kernel, key)
    torch.library.register_fake(f"hetero::{name}", fake, lib=_LIB)
    return getattr(torch.ops.hetero, name).default


def _gpu_cpu_mm(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    """(x @ w_gpu.T on x's device, x @ w_cpu.T computed on the host, back on x's device)."""
    if x.device.type != "cuda":
        # no GPU (tests, CPU-only machines): both shares here, same arithmetic per row
        y_cpu = x.to(w_cpu.dtype) @ w_cpu.t()
        return [x @ w_gpu.t(), y_cpu.to(x.dtype)]
    chain = _STAGING.chain(x.device)
    if chain is not None:
        return chain.mm(x, w_gpu, w_cpu)
    x_host, ready = _to_host(x, "x")
    y_gpu = x @ w_gpu.t()  # queued behind the copy; runs while the CPU multiplies
    ready.synchronize()
    xc = x_host if x_host.dtype == w_cpu.dtype else x_host.to(w_cpu.dtype)
    y_host, y_dev = _STAGING.get(x.device, "y", (x.shape[0], w_cpu.shape[0]), w_cpu.dtype)
    torch.mm(xc, w_cpu.t(), out=y_host)
    return [y_gpu, from_host(y_host, y_dev, x.device, x.dtype)]


def _to_host(x: torch.Tensor, role: str) -> tuple[torch.Tensor, torch.cuda.Event]:
    """Queues x's copy into the pinned buffer `role`; (the buffer, an event past the copy).
    The caller queues its GPU work next (behind the copy, so it does not delay it), then
    waits on the event: a spinning wait, since the thread that waits is the one that
    multiplies next, and a blocking wait sleeps in the kernel for tens of microseconds past
    the copy, on every hand-off."""
    x_host, _ = _STAGING.get(x.device, role, tuple(x.shape), x.dtype)
    x_host.copy_(x, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record(torch.cuda.current_stream(x.device))
    return x_host, ready


def _mm_fake(x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
    return [x.new_empty((x.shape[0], w_gpu.shape[0])), x.new_empty((x.shape[0], w_cpu.shape[0]))]


gpu_cpu_mm = _register(
    "gpu_cpu_mm(Tensor x, Tensor w_gpu, Tensor w_cpu) -> Tensor[]", _gpu_cpu_mm, _mm_fake
)

# The MLP's activation by the name the op takes (a string: the schema has no callables)
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_tanh": functools.partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


# The functions from here to the tasks are TorchScript as well as Python (an overlapped
# hand-off runs them in a TorchScript task): hence the if-chains and explicit types.


def mlp_features(w: torch.Tensor, gated: bool) -> int:
    """Intermediate features in one side's MLP share `w`: [gate rows; up rows; down's
    columns, transposed] (no gate rows when not gated), all [features, hidden]."""
    return w.shape[0] // (3 if gated else 2)


def mlp_share(
    x: torch.Tensor,
    w: torch.Tensor,
    act: str,
    gated: bool,
    out: torch.Tensor | None = None,
    host: bool = False,
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) (or down(act(up(x)))) over the features `w` holds: a
    [tokens, hidden] partial sum of the MLP's output. `host`: `w` is a CPU share, its down
    block holding down's columns hidden-major (runtime/split_linear.py, SharedMatmuls.cut,
    says why)."""
    r = mlp_features(w, gated)
    inner = 2 * r if gated else r
    h = torch.mm(x, w[:inner].t())  # gate and up in one product
    if gated:
        h = _activate(act, h[:, :r]) * h[:, r:]
    else:
        h = _activate(act, h)
    down = w[inner:]
    if host:
        down = down.reshape(w.shape[1], r).t()  # [hidden, features] rows, read transposed
    if out is None:
        return torch.mm(h, down)
    return torch.mm(h, down, out=out)


def _activation(act: str, h: torch.Tensor) -> torch.Tensor:
    """ACTIVATIONS[act](h), written out (TorchScript has no table of callables)."""
    if act == "silu":
        return F.silu(h)
    if act == "gelu":
        return F.gelu(h)
    if act == "gelu_tanh":
        return F.gelu(h, approximate="tanh")
    if act == "relu":
        return F.relu(h)
    raise ValueError("unknown MLP activation " + act)


def _activate(act: str, h: torch.Tensor) -> torch.Tensor:
    """act(h) in float32, rounded once to h's 16-bit dtype: what the unsplit program computes
    on its GPU, where a 16-bit model's SiLU runs in float32 between casts
    (partitioner/mlp_pattern.py) and CUDA's activation kernels compute 16-bit inputs in
    float32. The CPU's float16 GELU does not (1-ulp differences in ~6% of values against
    the float32 GELU, torch 2.13): the host converts explicitly."""
    low = h.dtype == torch.float16 or h.dtype == torch.bfloat16
    if low and not h.is_cuda:
        return _activation(act, h.float()).to(h.dtype)
    return _activation(act, h)


def _gpu_cpu_mlp(
    x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor, act: str, gated: bool
) -> torch.Tensor:
    """The MLP of x: the GPU's features' partial sum plus the CPU's (computed on the host in
    w_cpu's dtype), added on x's device."""
    if x.device.type != "cuda":
        y = mlp_share(x, w_gpu, act, gated)
        return y.add_(mlp_share(x.to(w_cpu.dtype), w_cpu, act, gated, host=True))
    chain = _STAGING.chain(x.device)
    if chain is not None:
        return chain.mlp(x, w_gpu, w_cpu, act, gated)
    # Roles of their own: a layer calls both ops, and each buffer's reuse rests only on the
    # ordering of its own role's calls (_Staging).
    x_host, ready = _to_host(x, "mlp_x")
    y = mlp_share(x, w_gpu, act, gated)  # queued behind the copy; runs while the CPU works
    ready.synchronize()
    xc = x_host if x_host.dtype == w_cpu.dtype else x_host.to(w_cpu.dtype)
    y_host, y_dev = _STAGING.get(x.device, "mlp_y", (x.shape[0], w_cpu.shape[1]), w_cpu.dtype)
    mlp_share(xc, w_cpu, act, gated, out=y_host, host=True)
    if y_dev is None:
        return y.add_(y_host.to(x.device, non_blocking=True))
    # the sum's kernel reads the CPU's rows from pinned memory: no copy engine queue
    return y.add_(y_dev)


def _mlp_fake(
    x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor, act: str, gated: bool
) -> torch.Tensor:
    return x.new_empty((x.shape[0], w_gpu.shape[1]))


gpu_cpu_mlp = _register(
    "gpu_cpu_mlp(Tensor x, Tensor w_gpu, Tensor w_cpu, str act, bool gated) -> Tensor",
    _gpu_cpu_mlp,
    _mlp_fake,
)


# ---- overlapped hand-offs (`overlapped()`) --------------------------------------------------
# A task spins on the GPU's "x is on the host" flag, multiplies, writes its rows, then sets
# the "rows are there" flag the GPU stream waits on. Each task first waits for the one before
# (a TorchScript wait suspends the task rather than a thread), so one task at a time holds a
# core, in the order the GPU needs them. Every buffer and flag can be reused by the next
# hand-off without a host wait: the GPU writes the next x only after it has read the previous
# rows, which the task wrote only after it had read the previous x.

_X, _Y = 0, 16  # the two flags' cells: 64 bytes apart, so they sit on their own cache lines


def _task(
    prev: torch.jit.Future[list[torch.Tensor]],
    cells: torch.Tensor,
    seq: int,
    x: torch.Tensor,
    xc: torch.Tensor,
    convert: bool,
    w: torch.Tensor,
    act: str,
    gated: bool,
    y: torch.Tensor,
) -> list[torch.Tensor]:
    """x @ w.T into y (`act` ""), or the MLP share of `w` (mlp_share), once the GPU has set
    the x flag to `seq` and the task before has run; then sets the rows flag to `seq`."""
    torch.jit.wait(prev)
    while int(cells[0]) != seq:  # _X
        pass
    if convert:
        xc.copy_(x)
    if act == "":
        torch.mm(xc, w.t(), out=y)
    else:
        mlp_share(xc, w, act, gated, y, True)
    cells[16] = seq  # _Y
    # Returned so that the task's future holds them: a tensor Python also holds needs the
    # Python lock when its C++ count drops from two to one (torch releases its PyObject),
    # and without the future's references that drop came as this thread ended the task. It
    # then waited for the launching thread to let go of the lock; in one GPU run that thread
    # held it inside cuModuleLoad (a kernel's first use), which waited for the GPU, which
    # waited on this task's flag: a hang (BENCHMARKS.md, run 21). The chain keeps the
    # futures and drops them with the lock held (_Chain.drain).
    return [cells, x, xc, w, y]


def _queue(
    prev: torch.jit.Future[list[torch.Tensor]],
    cells: torch.Tensor,
    seq: int,
    x: torch.Tensor,
    xc: torch.Tensor,
    convert: bool,
    w: torch.Tensor,
    act: str,
    gated: bool,
    y: torch.Tensor,
) -> torch.jit.Future[list[torch.Tensor]]:
    # fork only runs asynchronously when called from TorchScript, hence this function
    fut = torch.jit.fork(_task, prev, cells, seq, x, xc, convert, w, act, gated, y)
    return fut


def _done(seq: int) -> list[torch.Tensor]:
    return torch.jit.annotate(list[torch.Tensor], [])


def _finished(seq: int) -> torch.jit.Future[list[torch.Tensor]]:
    fut = torch.jit.fork(_done, seq)
    return fut


@functools.cache
def _tasks() -> dict[str, Callable] | None:
    """The task queuers compiled by TorchScript, or None (warned) where it cannot: its
    interpreter runs them off the Python lock, which a Python thread would hold and lose
    to the launching thread for up to the 5 ms switch interval per hand-off."""
    try:
        with warnings.catch_warnings():
            # torch 2.13 deprecates torch.jit.script for models; a task has no alternative
            # that runs off the Python lock (torch.compile and export do not fork)
            warnings.simplefilter("ignore", DeprecationWarning)
            tasks = {
                "queue": torch.jit.script(_queue),
                "finished": torch.jit.script(_finished),
            }
        _one_task_thread(tasks)
        return tasks
    except Exception as e:  # any failure: keep the synchronous path
        warnings.warn(
            f"gpu_cpu_mm: TorchScript cannot compile the overlapped hand-off ({e}); split "
            "layers hand off synchronously",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


def _one_task_thread(tasks: dict[str, Callable]) -> None:
    """Runs every task on one inter-op thread whose OpenMP team has a core less than the
    process's threads, when this process has started no inter-op work yet (else as it is).

    One thread: in an H200 trace the tasks hopped over 14 inter-op threads, each with its
    own OpenMP team gone to sleep since its last task, and the products ran at ~33 GB/s
    against 57 calibrated. A core less: the launching thread keeps working while a task
    multiplies, and an OpenMP team one thread larger than the free cores waits for its
    slowest thread (benchmarks/cpu_task_rates_gpu.py: a task beside a spinning CUDA
    synchronisation ran 2x slower). A pool thread reads the thread count when it starts,
    so the count is lowered only around the first task."""
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:  # the pool already runs: tasks go to its threads
        log.info("overlapped hand-offs share the inter-op pool (%s)", e)
        return
    threads = torch.get_num_threads()
    lowered = threads > 1 and threads >= (os.cpu_count() or threads)
    if lowered:
        torch.set_num_threads(threads - 1)
    try:
        tasks["finished"](0).wait()  # starts the pool's thread
    finally:
        if lowered:
            torch.set_num_threads(threads)


def settle(device: torch.device) -> None:
    """Sleeps until this thread's overlapped tasks on `device` have run. Called before a
    copy to the host that waits for the GPU: CUDA spins a core in that wait, one the tasks'
    OpenMP team is using, for most of a decode step (the launching thread is done first)."""
    chain = _STAGING.chains.get(device) if _STAGING.depth else None
    if chain is None:
        return
    with contextlib.suppress(BaseException):  # a failure is drain()'s to report
        chain.last.wait()


_RELEASE_TIMEOUT_S = 60.0


class _Chain:
    """One device's overlapped hand-offs: the flags, the task queue, and a watchdog that
    releases the GPU if a task fails (a stream waiting on a flag nobody sets would hang
    the process at its next synchronisation, with no error)."""

    def __init__(
        self, device: torch.device, flags: StreamFlags, tasks: dict, staging: _Staging
    ) -> None:
        self.device = device
        self.flags = flags
        self.tasks = tasks
        self.staging = staging
        self.cells = torch.zeros(2 * _Y, dtype=torch.int32)
        if device.type == "cuda":
            self.cells = self.cells.pin_memory()  # the stream reads and writes them
        # every task queued since the last drain(): each holds its tensors (_task's note)
        self._held: list[torch.jit.Future] = []
        self.x_at = flags.address(self.cells[_X : _X + 1])
        self.y_at = flags.address(self.cells[_Y : _Y + 1])
        self.seq = 0
        self.clock: HandoffClock | None = None  # the stage run being timed, if one is
        self.last = tasks["finished"](0)
        self.failure: BaseException | None = None
        self._watch: queue.SimpleQueue = queue.SimpleQueue()
        self._idle = threading.Event()
        self._idle.set()
        self._pending = 0
        self._lock = threading.Lock()
        threading.Thread(target=self._watchdog, name="hetero-handoff-watch", daemon=True).start()

    def mm(self, x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor) -> list[torch.Tensor]:
        seq, stream, x_host, xc = self._send(x, "x", w_cpu.dtype)
        timed = self._sent(stream)
        y_host, y_dev = self.staging.get(x.device, "y", (x.shape[0], w_cpu.shape[0]), w_cpu.dtype)
        self._queue_task(seq, x_host, xc, w_cpu, "", False, y_host)
        y_gpu = x @ w_gpu.t()  # runs while the CPU multiplies
        self.flags.wait(stream, self.y_at, seq)
        if timed is not None:
            timed.record(stream)
        return [y_gpu, from_host(y_host, y_dev, x.device, x.dtype)]

    def mlp(
        self, x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor, act: str, gated: bool
    ) -> torch.Tensor:
        if act not in ACTIVATIONS:
            raise ValueError(
                f"gpu_cpu_mlp: unknown activation {act!r}; one of {sorted(ACTIVATIONS)}"
            )
        seq, stream, x_host, xc = self._send(x, "mlp_x", w_cpu.dtype)
        timed = self._sent(stream)
        y_host, y_dev = self.staging.get(
            x.device, "mlp_y", (x.shape[0], w_cpu.shape[1]), w_cpu.dtype
        )
        self._queue_task(seq, x_host, xc, w_cpu, act, gated, y_host)
        y = mlp_share(x, w_gpu, act, gated)
        self.flags.wait(stream, self.y_at, seq)
        if timed is not None:
            timed.record(stream)
        if y_dev is None:
            return y.add_(y_host.to(x.device, non_blocking=True))
        return y.add_(y_dev)

    def _send(
        self, x: torch.Tensor, role: str, cpu_dtype: torch.dtype
    ) -> tuple[int, torch.cuda.Stream, torch.Tensor, torch.Tensor]:
        """Queues x's copy to the host and the flag after it; (seq, stream, x on the host,
        the buffer the task converts it into: x's own where the dtypes agree)."""
        if self.failure is not None:
            raise self._error()
        self.seq = self.seq % 0x7FFFFFFF + 1  # flags are int32; 0 is the initial value
        stream = torch.cuda.current_stream(x.device)
        x_host, _ = self.staging.get(x.device, role, tuple(x.shape), x.dtype)
        x_host.copy_(x, non_blocking=True)
        self.flags.write(stream, self.x_at, self.seq)
        xc = x_host
        if cpu_dtype != x.dtype:
            xc, _ = self.staging.get(x.device, f"{role}c", tuple(x.shape), cpu_dtype)
        return self.seq, stream, x_host, xc

    def _sent(self, stream: torch.cuda.Stream) -> torch.cuda.Event | None:
        """Where a stage run is timed: marks x sent on `stream`; the event to record when
        the rows are back."""
        if self.clock is None:
            return None
        sent, back = self.clock.pair()
        sent.record(stream)
        return back

    def _queue_task(
        self,
        seq: int,
        x: torch.Tensor,
        xc: torch.Tensor,
        w: torch.Tensor,
        act: str,
        gated: bool,
        y: torch.Tensor,
    ) -> None:
        """Queues the task for hand-off `seq`."""
        task = self.tasks["queue"](self.last, self.cells, seq, x, xc, xc is not x, w, act, gated, y)
        self._held.append(task)
        self._queued(seq, task)

    def _queued(self, seq: int, task: torch.jit.Future) -> None:
        self.last = task
        with self._lock:
            self._pending += 1
            self._idle.clear()
        self._watch.put((seq, task))

    def _watchdog(self) -> None:
        while True:
            seq, task = self._watch.get()
            try:
                task.wait()  # off the Python lock
            except BaseException as e:  # reported by drain()
                if self.failure is None:
                    self.failure = e
                self._release(seq)
            with self._lock:
                self._pending -= 1
                if not self._pending:
                    self._idle.set()

    def _release(self, seq: int) -> None:
        """Sets the rows-ready flag of the failed hand-off `seq` once the GPU has reached
        it, so the stream goes on (computing on stale rows, which drain() then refuses)."""
        deadline = time.monotonic() + _RELEASE_TIMEOUT_S
        while int(self.cells[_X]) != seq and time.monotonic() < deadline:
            time.sleep(1e-4)
        self.cells[_Y] = seq

    def drain(self, *, raise_failure: bool = True) -> None:
        """Waits for every queued task (and the watchdog's look at it); raises WorkerError
        if one failed."""
        self._idle.wait()
        if self._held:
            # the task thread ends a task's frame after completing its future: once a no-op
            # queued behind them has run, no frame holds the tensors, and they are released
            # here, with the Python lock (_task's note)
            self.tasks["finished"](0).wait()
            self._held.clear()
        if self.staging.retired:
            torch.cuda.current_stream(self.device).synchronize()  # kernels may read them
        if self.failure is not None:
            err = self._error()
            self.failure = None
            if raise_failure:
                raise err

    def _error(self) -> WorkerError:
        return WorkerError(
            f"a split layer's CPU share failed on the host ({type(self.failure).__name__}: "
            f"{self.failure}); the step's output is not trustworthy and was dropped. What to "
            "do: report it with the model and plan (`explain()`); a generation bound with "
            "StageBinder(overlap_handoffs=False) runs its hand-offs synchronously."
        )
