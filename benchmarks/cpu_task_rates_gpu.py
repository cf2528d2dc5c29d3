"""How fast the host CPU computes a split layer's share where an overlapped hand-off computes
it (backends/gpu_cpu_mm.py `overlapped`): in the calling thread, in a TorchScript task, and
in a task while the calling thread waits for the GPU (a spinning CUDA synchronisation takes
a core from the task's OpenMP threads).

    python benchmarks/cpu_task_rates_gpu.py --json $OUT/cpu_task.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from pathlib import Path

import torch

from hetero.backends import gpu_cpu_mm as gcm

# a LLaMA-7B layer's four CPU products at 47% of its rows: (rows, cols)
SHAPES = {"qkv": (5760, 4096), "o": (1920, 4096), "gate_up": (10368, 4096), "down": (4096, 5184)}


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def rates(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, task) -> dict:
    row = {"MiB": w.numel() * w.element_size() / 2**20}
    row["here_ms"] = median_ms(lambda: torch.mm(x, w.t(), out=y))
    row["task_ms"] = median_ms(lambda: task(x, w, y).wait())
    if torch.cuda.is_available():
        times: list[float] = []

        def measure() -> None:
            t = time.perf_counter()
            task(x, w, y).wait()
            times.append(time.perf_counter() - t)

        for _ in range(10):
            torch.cuda._sleep(100_000_000)  # the GPU busy well past the task
            th = threading.Thread(target=measure)
            th.start()
            torch.cuda.synchronize()  # this thread waits as a step's end does
            th.join()
        row["task_while_cuda_sync_ms"] = statistics.median(times) * 1e3
    for k in [k for k in row if k.endswith("_ms")]:
        row[k.replace("_ms", "_GBps")] = row["MiB"] * 2**20 / row[k] / 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--dtypes", nargs="*", default=["float16", "bfloat16"])
    args = ap.parse_args()
    tasks = gcm._tasks()
    out: dict = {"threads": torch.get_num_threads(), "interop": torch.get_num_interop_threads()}
    cells = torch.zeros(2 * gcm._Y, dtype=torch.int32)
    seq = [0]

    def task(x, w, y):
        seq[0] += 1
        cells[gcm._X] = seq[0]
        return tasks["queue"](tasks["finished"](0), cells, seq[0], x, x, False, w, "", False, y)

    for dt in args.dtypes:
        dtype = getattr(torch, dt)
        for name, (rows, cols) in SHAPES.items():
            w = torch.randn(rows, cols).to(dtype)
            row = rates(torch.randn(1, cols).to(dtype), w, torch.empty(1, rows, dtype=dtype), task)
            out[f"{dt}:{name}"] = row
            print(dt, name, {k: round(v, 3) for k, v in row.items()}, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
