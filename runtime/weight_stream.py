"""Stream a partition's weights from host memory to the GPU just before it runs.

A placement is (compute device, weight home). For partitions whose weights live in host
memory, `WeightStreamer` keeps pinned host copies and `slots` GPU buffers (two: double
buffering). While partition i computes on the current stream, partition i+1's weights
copy on a side stream into the other slot; partition i+2 reuses slot i's buffer only
after an event says partition i finished reading it. On a fast link the copies hide
behind compute (prefill) or run at the link's rate (decode): the cost model prices a
streamed partition as max(compute, weight bytes / link bandwidth).

Without CUDA (tests, CPU-only machines) it hands out the host tensors unchanged, so the
same code path runs everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

_ALIGN = 256  # bytes; keeps every carved tensor aligned for vectorised kernels


def _aligned(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class WeightStreamer:
    """Double-buffered host->device weight copies for a fixed sequence of partitions."""

    def __init__(
        self,
        weights: Sequence[Mapping[str, torch.Tensor]],
        device: torch.device | str = "cuda",
        slots: int = 2,
    ) -> None:
        if slots < 1:
            raise ValueError("slots must be >= 1")
        self.device = torch.device(device)
        self.slots = min(slots, max(1, len(weights)))
        self.cuda = self.device.type == "cuda" and torch.cuda.is_available()
        self.names = [tuple(w) for w in weights]
        self.layouts: list[list[tuple[int, torch.dtype, torch.Size]]] = []
        self.host: list[list[torch.Tensor]] = []
        for w in weights:
            offset, layout, host = 0, [], []
            for t in w.values():
                t = t.detach().contiguous()
                layout.append((offset, t.dtype, t.shape))
                offset += _aligned(t.numel() * t.element_size())
                host.append(t.pin_memory() if self.cuda else t)
            self.layouts.append(layout)
            self.host.append(host)
        self.slot_bytes = max((_aligned(self._size(i)) for i in range(len(weights))), default=0)
        if self.cuda:
            self.buffers = [
                torch.empty(self.slot_bytes, dtype=torch.uint8, device=self.device)
                for _ in range(self.slots)
            ]
            self.stream = torch.cuda.Stream(self.device)
            self.copied = [torch.cuda.Event() for _ in range(self.slots)]
            self.freed = [torch.cuda.Event() for _ in range(self.slots)]
            for e in self.freed:
                e.record(torch.cuda.current_stream(self.device))
        self.in_slot: list[int | None] = [None] * self.slots
        self.bytes_copied = 0

    def _size(self, i: int) -> int:
        if not self.layouts[i]:
            return 0
        off, dtype, shape = self.layouts[i][-1]
        return off + torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

    @property
    def device_bytes(self) -> int:
        """GPU memory the streamer holds (all slots)."""
        return self.slot_bytes * self.slots if self.cuda else 0

    def prefetch(self, i: int) -> None:
        """Start copying partition i's weights into its slot (no-op if already there)."""
        if not 0 <= i < len(self.host):
            return
        slot = i % self.slots
        if self.in_slot[slot] == i or not self.cuda:
            self.in_slot[slot] = i
            return
        buf = self.buffers[slot]
        with torch.cuda.stream(self.stream):
            self.stream.wait_event(self.freed[slot])  # the slot's previous tenant finished
            for (off, _dtype, _shape), src in zip(self.layouts[i], self.host[i], strict=True):
                n = src.numel() * src.element_size()
                buf[off : off + n].copy_(src.view(-1).view(torch.uint8), non_blocking=True)
            self.copied[slot].record(self.stream)
        self.in_slot[slot] = i
        self.bytes_copied += self._size(i)

    def acquire(self, i: int) -> list[torch.Tensor]:
        """Partition i's weights on the device (in insertion order); prefetches i+1."""
        self.prefetch(i)
        slot = i % self.slots
        if not self.cuda:
            out = list(self.host[i])
        else:
            torch.cuda.current_stream(self.device).wait_event(self.copied[slot])
            buf = self.buffers[slot]
            out = [
                buf[
                    off : off
                    + torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
                ]
                .view(dtype)
                .view(shape)
                for off, dtype, shape in self.layouts[i]
            ]
        if self.slots > 1:
            self.prefetch((i + 1) % len(self.host))
        return out

    def release(self, i: int) -> None:
        """Partition i's kernels are queued: its slot may be overwritten once they finish."""
        if self.cuda:
            self.freed[i % self.slots].record(torch.cuda.current_stream(self.device))
