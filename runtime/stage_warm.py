"""`python -m hetero.runtime.stage_warm SPEC`: compile a generation stage's program through
Inductor as the binding process will (`stage_compile.InductorStage`), on zero-filled inputs
laid out as its first call's, and exit, leaving the compiled graph in Inductor's on-disk
caches (runtime/stage_warming.py says why). SPEC is a JSON file written by `StageWarmings`:

    {"program": ".../program.pt2", "device": "cuda:0", "threads": 16, "name": "decode p0",
     "dynamic_dims": [[0, 1]], "inputs": [[shape, stride, dtype], ...],
     "imports": ["transformers.integrations.moe"]}

("imports": modules that register library operators the program calls, runtime/
library_ops.py: imported before the program is read, which fails without them.)

On a GPU the compiled program's one call runs in the process's turn on the card
(backends/gpu_turn.py): the first launch of Inductor's kernels times their configs and
caches the best, which the binding process reads instead of timing them, and two warmings
(prefill's and decode's) never time kernels at once.

`python -m hetero.runtime.stage_warm --standby [DEVICE]` (a `warming.Standby`): get ready
for DEVICE first, then read [SPEC] as one JSON list from stdin; exit at once on an empty
input.
"""

from __future__ import annotations

import json
import sys
from functools import partial
from pathlib import Path

import torch

from hetero.backends.gpu_turn import timing_turn
from hetero.backends.inductor_warm import ready
from hetero.backends.library_ops import import_all
from hetero.backends.warming import DONE, handed_args, mark
from hetero.runtime.stage_compile import InductorStage, on_device


def main(argv: list[str]) -> int:
    handed = handed_args(argv, lambda dev: ready(torch.device(dev or "cpu")))
    if handed is None:  # a standby never handed work
        return 0
    argv = handed
    if len(argv) != 1:
        print(__doc__.split("\n")[0], file=sys.stderr)
        return 2
    spec = json.loads(Path(argv[0]).read_text())
    dev = torch.device(spec["device"])
    torch.set_num_threads(int(spec["threads"]))  # CPU kernels carry their OpenMP width
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    import_all(spec.get("imports", ()))
    # torch.export.load reads a program; it never unpickles code.
    program = torch.export.load(spec["program"])
    stage = InductorStage(
        on_device(program, dev),
        dynamic_dims=[tuple(d) for d in spec["dynamic_dims"]],
        name=spec["name"],
        launch_in=partial(timing_turn, dev) if dev.type == "cuda" else None,
    )
    # laid out exactly as the binder's call hands them over (`stage_spec`): Inductor keys
    # its cache by every stride, a size-1 dim's too
    args = [
        torch.empty_strided(shape, stride, dtype=getattr(torch, dtype), device=dev).zero_()
        for shape, stride, dtype in spec["inputs"]
    ]
    with torch.inference_mode():  # as the binding process calls it (BoundRunner)
        stage(*args)
    if stage.failed is not None:
        print(f"{spec['name']}: {type(stage.failed).__name__}: {stage.failed}", file=sys.stderr)
        return 1
    mark(DONE)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
