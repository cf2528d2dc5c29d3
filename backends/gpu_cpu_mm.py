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
"""

from __future__ import annotations

import functools
import math
import threading
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F


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
        # host_to_device's roles: an event past the last kernel that read each buffer
        self.reads: dict[tuple[torch.device, str], torch.cuda.Event] = {}

    def get(
        self, device: torch.device, role: str, shape: tuple[int, ...], dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the pinned buffer as `shape`/`dtype`, the same bytes on `device` or None where
        the GPU cannot read host memory)."""
        nbytes = math.prod(shape) * dtype.itemsize
        got = self.buffers.get((device, role))
        if got is None or got[0].numel() < nbytes:
            size = max(nbytes, 2 * got[0].numel() if got is not None else 1)
            host = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            got = (host, _device_view(host, device))
            self.buffers[(device, role)] = got
        host, dev = got
        mine = host[:nbytes].view(dtype).view(shape)
        return mine, None if dev is None else dev[:nbytes].view(dtype).view(shape)


_STAGING = _Staging()


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


def mlp_features(w: torch.Tensor, gated: bool) -> int:
    """Intermediate features in one side's MLP share `w`: [gate rows; up rows; down's
    columns, transposed] (no gate rows when not gated), all [features, hidden]."""
    return w.shape[0] // (3 if gated else 2)


def mlp_share(
    x: torch.Tensor, w: torch.Tensor, act: str, gated: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) (or down(act(up(x)))) over the features `w` holds: a
    [tokens, hidden] partial sum of the MLP's output."""
    r = mlp_features(w, gated)
    inner = 2 * r if gated else r
    h = x @ w[:inner].t()  # gate and up in one product
    h = _activate(act, h[:, :r]) * h[:, r:] if gated else _activate(act, h)
    return torch.mm(h, w[inner:], out=out)


_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _activate(act: str, h: torch.Tensor) -> torch.Tensor:
    """act(h) in float32, rounded once to h's 16-bit dtype: what the unsplit program computes
    on its GPU, where a 16-bit model's SiLU runs in float32 between casts
    (partitioner/mlp_pattern.py) and CUDA's activation kernels compute 16-bit inputs in
    float32. The CPU's float16 GELU does not (1-ulp differences in ~6% of values against
    the float32 GELU, torch 2.13): the host converts explicitly."""
    if h.dtype in _LOW_PRECISION and h.device.type != "cuda":
        return ACTIVATIONS[act](h.float()).to(h.dtype)
    return ACTIVATIONS[act](h)


def _gpu_cpu_mlp(
    x: torch.Tensor, w_gpu: torch.Tensor, w_cpu: torch.Tensor, act: str, gated: bool
) -> torch.Tensor:
    """The MLP of x: the GPU's features' partial sum plus the CPU's (computed on the host in
    w_cpu's dtype), added on x's device."""
    if x.device.type != "cuda":
        y = mlp_share(x, w_gpu, act, gated)
        return y.add_(mlp_share(x.to(w_cpu.dtype), w_cpu, act, gated))
    # Roles of their own: a layer calls both ops, and each buffer's reuse rests only on the
    # ordering of its own role's calls (_Staging).
    x_host, ready = _to_host(x, "mlp_x")
    y = mlp_share(x, w_gpu, act, gated)  # queued behind the copy; runs while the CPU works
    ready.synchronize()
    xc = x_host if x_host.dtype == w_cpu.dtype else x_host.to(w_cpu.dtype)
    y_host, y_dev = _STAGING.get(x.device, "mlp_y", (x.shape[0], w_cpu.shape[1]), w_cpu.dtype)
    mlp_share(xc, w_cpu, act, gated, out=y_host)
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
