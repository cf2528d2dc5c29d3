"""One process at a time times kernels on a GPU: its turn on the card.

Tuning picks a kernel's config by timing each one on the card, and a card shared by two
processes time-slices between them, so a timing taken while another process's kernels run
measures those too. Inductor times its kernels' configs on their first launch; a warming
process (backends/warming.py) launches its compiled program so that this timing happens
there, while the process that started it compiles and times hetero's own Triton kernels
(backends/triton/autotune.py). Both hold the card's turn while they time: an exclusive
lock on a file named for the card, which the system releases if the process dies.

Not reentrant: a process that holds the turn must not ask for it again (the second lock
would wait for the first). Only the leaves that time take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def card_id(dev: torch.device) -> str:
    """A name for the card behind `dev` that every process on the host shares: its UUID,
    which does not depend on CUDA_VISIBLE_DEVICES; its index where torch has none."""
    index = dev.index if dev.index is not None else torch.cuda.current_device()
    uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
    return str(uuid) if uuid is not None else f"cuda{index}"


@contextlib.contextmanager
def timing_turn(dev: torch.device) -> Iterator[None]:
    """Holds `dev`'s turn (waiting for it) while the block runs; on a CPU, nothing."""
    if dev.type != "cuda":
        yield
        return
    with held(Path(tempfile.gettempdir()) / f"hetero-gpu-turn-{card_id(dev)}.lock"):
        yield


@contextlib.contextmanager
def held(path: Path) -> Iterator[None]:
    """An exclusive lock on the file at `path` (made if missing) while the block runs,
    waiting for whichever process holds it; released by the system if this one dies."""
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
