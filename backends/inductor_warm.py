"""`python -m hetero.backends.inductor_warm ARTIFACT_DIR THREADS [DEVICE [MODULE...]]`:
compile an inductor artifact's program on its example inputs for DEVICE (default: the CPU)
and exit, leaving the compiled graph in Inductor's on-disk caches for the process that
started it (backends/warming.py says why). Each MODULE is imported first: it registers a
library operator the program calls (backends/library_ops.py; Mixtral's
`transformers::grouped_mm_fallback`), without which the program cannot be read.

The compile is the one `InductorBackend.load` makes, with the caller's thread count (the
CPU kernels' OpenMP width is part of their code, so a different count would miss the cache).
The compiled program is then called on its example inputs (a program that updates its own
buffers as well: its state here is thrown away). On a GPU that call runs in the process's
turn on the card (backends/gpu_turn.py): the first launch of Inductor's kernels times their
configs and caches the best beside them, so the loading process's first call reads them
instead of timing them (tests/gpu/test_inductor_warming_gpu.py), and never while that process
times its own kernels.

`python -m hetero.backends.inductor_warm --standby [DEVICE]` (a `warming.Standby`): get
ready for DEVICE first, then read [ARTIFACT_DIR, THREADS, DEVICE, MODULE...] as one JSON list
from stdin; exit at once on an empty input.
"""

from __future__ import annotations

import sys
from functools import partial
from pathlib import Path

import torch

from hetero.backends.gpu_turn import timing_turn
from hetero.backends.inductor import compile_now, compile_program
from hetero.backends.library_ops import import_all
from hetero.backends.warming import DONE, handed_args, mark


def main(argv: list[str]) -> int:
    mark("imported")
    handed = handed_args(argv, lambda dev: ready(torch.device(dev or "cpu")))
    if handed is None:  # a standby never handed work
        return 0
    argv = handed
    if len(argv) < 2:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    path, threads = Path(argv[0]), int(argv[1])
    dev = torch.device(argv[2] if len(argv) > 2 else "cpu")
    import_all(argv[3:])
    torch.set_num_threads(threads)
    gpu = dev.type == "cuda"
    if gpu:
        torch.cuda.set_device(dev)
    compiled, ep = compile_program(path, dev, launch_in=partial(timing_turn, dev) if gpu else None)
    mark("read")
    if not compile_now(compiled, ep, dev, state_too=True):
        print(f"{path}: the program keeps no example inputs to compile on", file=sys.stderr)
        return 1
    mark(DONE)
    return 0


def ready(dev: torch.device) -> None:
    """Pay now what any first compile in a process pays before its own work: the compiler's
    imports, Inductor's probe of the CPU's vector instructions (on a CPU) or the GPU's
    context and Triton's (on a GPU) and dynamo's and Inductor's set-up, by compiling a
    one-op function (its kernel lands in the cache too) and forgetting it. A failure here is
    no failure of the warming: the real compile retries what it needs."""
    try:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        torch.compile(_tiny, fullgraph=True)(torch.ones(8, device=dev))
    except Exception as e:  # only a head start: the real compile reports its own errors
        print(f"getting ready: {type(e).__name__}: {e}", file=sys.stderr)
    torch._dynamo.reset()


def _tiny(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
