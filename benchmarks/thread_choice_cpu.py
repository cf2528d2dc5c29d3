"""A host CPU's decode team width chosen by measurement (runtime/thread_choice.py), against
the caller's full team, on this CPU: alone, and beside a neighbour process that keeps one
core busy (another person's job on a shared box).

    OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0 .venv/bin/python benchmarks/thread_choice_cpu.py \
        [--runs 10] [--neighbour] [--json benchmarks/results/thread_choice_cpu.json]

The model is `benchmarks/decode_ops_cpu.py`'s (a user's Qwen2: 4 layers, 128 wide, float32),
compiled with `task="generate", feedback=True` on configs/clusters/cpu-2core.yaml: the
feedback round settles the CPU programs, then times whole decode steps at each candidate
width and keeps the fastest. Then 32-token generations, interleaved: hetero at the chosen
width, hetero at the full width (`LocalGeneration.decode_threads` reset), transformers'
eager `generate` at the full width and at one thread (the same choice made by hand); ms per
decoded token, the median over every step of every run. With `--neighbour`, a process
spinning on one core runs from before the compile to the end.
"""

from __future__ import annotations

import argparse
import itertools
import json
import multiprocessing
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
NEW = 32


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def _gaps(arrivals: tuple[list[int], list[float]]) -> list[float]:
    """ms between successive tokens of one generation (bench's arrival times)."""
    return [b - a for a, b in itertools.pairwise(arrivals[1])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--neighbour", action="store_true", help="a process spins on one core")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import hetero
    from benchmarks.decode_ops_cpu import qwen
    from hetero.interfaces.commands.bench_generate import _eager, _timed
    from hetero.runtime.generation import team_width

    stop = multiprocessing.Event()
    neighbour = None
    if args.neighbour:
        neighbour = multiprocessing.Process(target=_spin, args=(stop,), daemon=True)
        neighbour.start()
    try:
        model, (ids,) = qwen()
        full = torch.get_num_threads()
        lm = hetero.compile(
            model, task="generate", cluster=ROOT / "configs/clusters/cpu-2core.yaml",
            max_length=128, feedback=True,
        )  # fmt: skip
        gen = lm.generation
        choice = gen.thread_choice
        chosen = gen.decode_threads

        def hetero_at(width):
            def run() -> list[float]:
                gen.decode_threads = width
                return _gaps(_timed(lm.stream(ids, NEW)))

            return run

        def transformers_on_one() -> list[float]:
            # the same width choice made by hand for transformers: the best alternative
            with team_width(1):
                return _gaps(_eager(model, ids, NEW))

        ways = {
            f"hetero, chosen ({chosen} threads)": hetero_at(chosen),
            f"hetero, full team ({full} threads)": hetero_at(full),
            f"transformers eager ({full} threads)": lambda: _gaps(_eager(model, ids, NEW)),
            "transformers eager (1 thread)": transformers_on_one,
        }
        gaps: dict[str, list[float]] = {w: [] for w in ways}
        for fn in ways.values():  # warm
            fn()
        for _ in range(args.runs):  # interleaved: every way sees the same machine
            for w, fn in ways.items():
                gaps[w].extend(fn())
        gen.decode_threads = chosen
        lm.shutdown()
    finally:
        stop.set()
        if neighbour is not None:
            neighbour.join(timeout=5)
    out = {
        "torch": torch.__version__,
        "full_threads": full,
        "neighbour": args.neighbour,
        "choice": None if choice is None else {
            "chosen": dict(choice.threads), "median_ms": dict(choice.median_ms)
        },
        "ms_per_token_p50": {w: statistics.median(g) for w, g in gaps.items()},
    }  # fmt: skip
    print(f"neighbour spinning on a core: {args.neighbour}; settle: "
          f"{choice.note() if choice else 'nothing to choose'}")  # fmt: skip
    for w, ms in out["ms_per_token_p50"].items():
        print(f"  {w}: {ms:.3f} ms per token (p50)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
