"""`python -m hetero.backends.inductor_warm ARTIFACT_DIR THREADS`: compile an inductor
artifact's program on its example inputs and exit, leaving the compiled graph in Inductor's
on-disk caches for the process that started it (backends/warming.py says why).

The compile is the one `InductorBackend.load` makes, with the caller's thread count (the
CPU kernels' OpenMP width is part of their code, so a different count would miss the cache).
A program that updates its own buffers is called too: its state here is thrown away.

`python -m hetero.backends.inductor_warm --standby` (a `warming.Standby`): get ready first,
then read [ARTIFACT_DIR, THREADS] as one JSON list from stdin; exit at once on an empty input.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from hetero.backends.inductor import compile_now, compile_program
from hetero.backends.warming import STANDBY


def main(argv: list[str]) -> int:
    if argv == [STANDBY]:
        ready()
        line = sys.stdin.readline()
        if not line.strip():  # no work: the caller closed its end, or is gone
            return 0
        argv = json.loads(line)
    if len(argv) != 2:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    path, threads = Path(argv[0]), int(argv[1])
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    compiled, ep = compile_program(path, cpu)
    if not compile_now(compiled, ep, cpu, state_too=True):
        print(f"{path}: the program keeps no example inputs to compile on", file=sys.stderr)
        return 1
    return 0


def ready() -> None:
    """Pay now what any first compile in a process pays before its own work: the compiler's
    imports, Inductor's probe of the CPU's vector instructions and dynamo's and Inductor's
    set-up, by compiling a one-op function (its kernel lands in the cache too) and forgetting
    it. A failure here is no failure of the warming: the real compile retries what it needs."""
    try:
        torch.compile(_tiny, fullgraph=True)(torch.ones(8))
    except Exception as e:  # only a head start: the real compile reports its own errors
        print(f"getting ready: {type(e).__name__}: {e}", file=sys.stderr)
    torch._dynamo.reset()


def _tiny(x: torch.Tensor) -> torch.Tensor:
    return x * 2.0 + 1.0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
