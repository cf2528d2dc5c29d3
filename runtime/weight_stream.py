"""Stream weights from host memory to the GPU just before they are used.

A placement is (compute device, weight home). For groups whose weights live in host
memory, `WeightStreamer` keeps pinned host copies and `slots` GPU buffers (two: double
buffering, the planner's memory model). Items (one per streamed group, in execution
order) take the slots in turn: while item i computes on the current stream, item i+1's
weights copy on a side stream into another slot; a slot is overwritten only after an
event says its previous tenant's kernels finished. After the last item the first one is
prefetched again, so the next request starts with its first weights already in place.

On a fast link the copies hide behind compute (prefill) or run at the link's rate
(decode): the cost model prices a streamed group as max(compute, weight bytes / link).

Without CUDA (tests, CPU-only machines) it hands out the host tensors unchanged, so the
same code path runs everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_ALIGN = 256  # bytes; keeps every carved tensor aligned for vectorised kernels


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def slot_bytes(weights: Sequence[Mapping[str, torch.Tensor]]) -> int:
    """Bytes one slot needs to hold the largest of these items (as WeightStreamer packs them)."""
    return max((sum(_aligned(_nbytes(t)) for t in w.values()) for w in weights), default=0)


class WeightStreamer:
    """Double-buffered host->device weight copies for a fixed sequence of items."""

    def __init__(
        self,
        weights: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device | str = "cuda",
        slots: int = 2,
        *,
        buffers: Sequence[torch.Tensor] | None = None,
        stream: torch.cuda.Stream | None = None,
    ) -> None:
        """`buffers` / `stream`: slots and copy stream shared with another streamer of the
        same device that never runs at the same time (a generation's two phases): one copy
        stream keeps their copies in order; `adopt()` hands the slots over."""
        if slots < 1:
            raise ValueError(f"a WeightStreamer needs at least one slot, got slots={slots}")
        self.device = torch.device(device)
        self.slots = min(slots, max(1, len(weights)))
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.names = [tuple(w) for w in weights]
        # per item: (byte offset in a slot, dtype, shape) of each tensor, in insertion order
        self.layouts: list[list[tuple[int, torch.dtype, torch.Size]]] = []
        self.host: list[list[torch.Tensor]] = []
        # Per item, its tensors packed in one pinned buffer laid out as in a slot: one copy
        # per item. A decoder layer is ~9 tensors, two of them a few KB (norm weights), and
        # every copy call costs the copy engine its latency.
        self.packed: list[torch.Tensor] = []
        sizes = []
        for w in weights:
            offset, layout, host = 0, [], []
            for t in w.values():
                t = t.detach().contiguous()
                if t.device.type != "cpu":
                    t = t.cpu()
                layout.append((offset, t.dtype, t.shape))
                offset += _aligned(_nbytes(t))
                host.append(t)
            if self.cuda:
                packed = torch.empty(max(offset, 1), dtype=torch.uint8).pin_memory()
                for (off, _dtype, _shape), t in zip(layout, host, strict=True):
                    n = _nbytes(t)
                    if n:
                        packed[off : off + n].copy_(t.reshape(-1).view(torch.uint8))
                # the host tensors become views of the pinned buffer: no second copy in RAM
                host = [
                    packed[off : off + _nbytes(t)].view(t.dtype).view(t.shape) if _nbytes(t) else t
                    for (off, _dtype, _shape), t in zip(layout, host, strict=True)
                ]
                self.packed.append(packed)
            self.layouts.append(layout)
            self.host.append(host)
            sizes.append(offset)
        self.item_bytes = [sum(_nbytes(t) for t in h) for h in self.host]
        self.slot_bytes = max(sizes, default=0)
        self.tenant: list[int | None] = [None] * self.slots  # item held by each slot
        self.busy: set[int] = set()  # slots acquired and not yet released
        self.pending: set[int] = set()  # slots copied (or copying) and not yet acquired
        self._next = 0  # the slot the next copy goes to (round robin)
        self._views: dict[tuple[int, int], list[torch.Tensor]] = {}  # (slot, item) -> views
        self.bytes_copied = 0
        self._pad_s_per_byte = 0.0  # emulate_link: idle time added per copied byte
        self._cycles_per_s = 0.0
        if self.cuda:
            if buffers is not None:
                if len(buffers) < self.slots or any(b.numel() < self.slot_bytes for b in buffers):
                    raise ValueError(
                        f"shared slots hold {[b.numel() for b in buffers]} bytes; this "
                        f"streamer needs {self.slots} of {self.slot_bytes}"
                    )
                self.buffers = list(buffers[: self.slots])
            else:
                self.buffers = [
                    torch.empty(max(self.slot_bytes, 1), dtype=torch.uint8, device=self.device)
                    for _ in range(self.slots)
                ]
            self.stream = stream if stream is not None else torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(self.slots)]
            self.freed = [torch.cuda.Event() for _ in range(self.slots)]
            for e in self.freed:
                e.record(torch.cuda.current_stream(self.device))

    def __len__(self) -> int:
        return len(self.host)

    def adopt(self) -> None:
        """Take the slots over from whatever used them: nothing is held, and a slot is free
        once the work queued so far on the compute stream is done."""
        self.tenant = [None] * self.slots
        self.busy.clear()
        self.pending.clear()
        self._next = 0
        if self.cuda:
            for e in self.freed:
                e.record(torch.cuda.current_stream(self.device))

    def emulate_link(self, rate: float, native_rate: float) -> None:
        """For benchmarks: make each copy take its bytes / `rate` (a slower host link, say
        PCIe Gen3's 12 GB/s on a Gen5 box) by idling the copy stream after it for the
        difference to `native_rate`, the pinned copy rate measured on this machine. The
        compute stream is untouched, so overlap behaves as on the slower link."""
        if not self.cuda or rate >= native_rate:
            self._pad_s_per_byte = 0.0
            return
        self._pad_s_per_byte = 1.0 / rate - 1.0 / native_rate
        if not self._cycles_per_s:
            self._cycles_per_s = _sleep_cycles_per_s(self.device)

    @property
    def device_bytes(self) -> int:
        """GPU memory the streamer holds (all slots)."""
        return self.slot_bytes * self.slots if self.cuda else 0

    def _slot_of(self, i: int) -> int | None:
        for s, held in enumerate(self.tenant):
            if held == i:
                return s
        return None

    def prefetch(self, i: int, *, evict: bool = False) -> None:
        """Start copying item i's weights into a free slot (no-op if one already holds it).

        A slot is free when its tenant is released and was used since it was copied: a
        prefetched item is never evicted before it ran, unless `evict` (acquire's last resort).
        """
        if not 0 <= i < len(self.host) or self._slot_of(i) is not None:
            return
        order = [(self._next + k) % self.slots for k in range(self.slots)]
        idle = [s for s in order if s not in self.busy]
        free = [s for s in idle if s not in self.pending]
        if not free and not (evict and idle):
            return  # every slot is in use: item i is copied when it is acquired
        slot = (free or idle)[0]
        self._next = (slot + 1) % self.slots
        self.tenant[slot] = i
        self.pending.add(slot)
        if not self.cuda:
            return
        buf = self.buffers[slot]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[slot])  # the previous tenant's kernels finished
            src = self.packed[i]
            buf[: src.numel()].copy_(src, non_blocking=True)
            if self._pad_s_per_byte:
                pad = self.item_bytes[i] * self._pad_s_per_byte
                torch.cuda._sleep(int(pad * self._cycles_per_s))
            self.copied[slot].record(self.stream)
        self.bytes_copied += self.item_bytes[i]

    def acquire(self, i: int) -> list[torch.Tensor]:
        """Item i's weights on the device (insertion order); starts the copy of item i+1."""
        if not 0 <= i < len(self.host):
            raise IndexError(f"streamed item {i} does not exist; the streamer has {len(self)}")
        self.prefetch(i, evict=True)
        slot = self._slot_of(i)
        if slot is None:
            raise RuntimeError(
                f"no free slot for streamed item {i}: release() the items already acquired "
                f"(busy slots {sorted(self.busy)})"
            )
        self.busy.add(slot)
        self.pending.discard(slot)
        if not self.cuda:
            out = list(self.host[i])
        else:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            out = self._views.get((slot, i))
            if out is None:  # made once per slot and item: ~30 view ops a layer otherwise
                buf = self.buffers[slot]
                out = [
                    buf[off : off + t.numel() * t.element_size()].view(dtype).view(shape)
                    for (off, dtype, shape), t in zip(self.layouts[i], self.host[i], strict=True)
                ]
                self._views[(slot, i)] = out
            out = list(out)
        if len(self.host) > 1:
            self.prefetch((i + 1) % len(self.host))
        return out

    def release(self, i: int) -> None:
        """Item i's kernels are queued: its slot may be overwritten once they finish."""
        slot = self._slot_of(i)
        if slot is None:
            return
        self.busy.discard(slot)
        if self.cuda:
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        if len(self.host) > 1:
            # the slot just freed takes the next item when it is not already on its way
            self.prefetch((i + 1) % len(self.host))
            self.prefetch((i + 2) % len(self.host))


def _sleep_cycles_per_s(device: torch.device) -> float:
    """GPU clock cycles per second of `torch.cuda._sleep` (its argument is in cycles)."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    cycles = 20_000_000
    with torch.cuda.device(device):
        torch.cuda._sleep(cycles // 10)  # warm up
        start.record()
        torch.cuda._sleep(cycles)
        end.record()
        end.synchronize()
    return cycles / (start.elapsed_time(end) / 1e3)
