"""What going on at a warming's DONE mark saves, against waiting for its process to end (as
before 679f72f): GPT-2 small, 1 x 128, float32, compiled by `hetero.compile` on this
machine's CPUs (the measured choice among TVM, Inductor and eager), each compile in a fresh
process with fresh Inductor and hetero caches, the two ways alternating.

"end" emulates the old wait by waiting for the warming's process to end before the usual
wait; "done" is hetero as it is. Each row prints the compile's phases (`CompileTimes.note`).

    python benchmarks/warming_end_cpu.py --rounds 2 --json /tmp/warming_end.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from compile_times_cpu import in_fresh_process

CHILD = r"""
import json, sys, tempfile, time
sys.path.insert(0, sys.argv[2])
import torch
import hetero
from hetero.backends import warming
if sys.argv[1] == "end":
    mark_only = warming.Warming._wait
    def _wait(self, timeout_s):
        self._proc.wait(timeout_s)
        return mark_only(self, timeout_s)
    warming.Warming._wait = _wait
from compile_times_cpu import gpt2
torch.manual_seed(0)
model, inputs = gpt2(1, 128)
t = time.perf_counter()
with torch.no_grad():
    cm = hetero.compile(model, inputs, cache_dir=tempfile.mkdtemp(), executor="local")
wall = time.perf_counter() - t
print("ROWS", json.dumps({"way": sys.argv[1], "wall_s": wall, "note": cm.compile_times.note()}))
cm.shutdown()
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=2, help="alternations of the two ways")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    here = str(Path(__file__).resolve().parent)
    rows = []
    for _ in range(args.rounds):
        for way in ("end", "done"):
            row = in_fresh_process([sys.executable, "-c", CHILD, way, here], way)
            if row is None:
                continue
            rows.append(row)
            print(f"{way}: {row['wall_s']:.1f} s; {row['note']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
