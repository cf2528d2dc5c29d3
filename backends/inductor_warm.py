"""`python -m hetero.backends.inductor_warm ARTIFACT_DIR THREADS`: compile an inductor
artifact's program on its example inputs and exit, leaving the compiled graph in Inductor's
on-disk caches for the process that started it (backends/warming.py says why).

The compile is the one `InductorBackend.load` makes, with the caller's thread count (the
CPU kernels' OpenMP width is part of their code, so a different count would miss the cache).
A program that updates its own buffers is called too: its state here is thrown away.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from hetero.backends.inductor import compile_now, compile_program


def main(argv: list[str]) -> int:
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


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
