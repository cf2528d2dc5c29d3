"""What bounds a GPU+CPU decode step on this box: the host link, the CPU's matrix-vector
rate, and whether the two run at once without starving each other.

    python benchmarks/host_link_probe.py --json out.json      # on the GPU box
    python benchmarks/host_link_probe.py --quick              # a smoke test on a CPU

A batch-1 decode step of a model whose weights do not fit the GPU reads every weight that
is not resident once: either the copy engine streams it from pinned host memory, or the
CPU reads it from host memory and computes there. Both draw on the host's memory, so the
question for a plan that does both at once is the *concurrent* rate of each, not their
rates alone. Reported, each as GB/s of weight bytes:

- pinned host -> GPU copies (400 MB items, one stream);
- CPU matrix-vector products [B, K] x [K, N] for bf16 / fp16 / fp32 weights at the
  thread count given (a LLaMA-7B layer's shapes: K=4096, N in 4096, 11008, 12288);
- both at once: copies on a side stream while the CPU multiplies, each rate measured over
  the same wall-clock window;
- a GPU<->host round trip of a small activation (the cost of one hand-off between the two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import threading
import time

import torch


def gb_per_s(nbytes: float, seconds: float) -> float:
    return nbytes / seconds / 1e9


def cpu_info() -> dict:
    info = {"machine": platform.machine(), "threads": torch.get_num_threads()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["model"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
        info["amx_bf16"] = "amx_bf16" in flags
        info["avx512_bf16"] = "avx512_bf16" in flags
        info["avx512_fp16"] = "avx512_fp16" in flags
    except OSError:
        pass
    info["cpu_count"] = os.cpu_count()
    return info


def time_loop(fn, seconds: float) -> tuple[int, float]:
    """Call fn until `seconds` pass; (calls, elapsed)."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds:
            return n, el


def gemv_rates(batch: int, seconds: float) -> list[dict]:
    rows = []
    k = 4096
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for n in (4096, 11008, 12288):
            w = torch.randn(n, k, dtype=dtype)
            x = torch.randn(batch, k, dtype=dtype)
            calls, el = time_loop(lambda w=w, x=x: torch.mm(x, w.t()), seconds)
            nbytes = w.numel() * w.element_size()
            rows.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "batch": batch,
                    "n": n,
                    "k": k,
                    "ms": el / calls * 1e3,
                    "weight_GBps": gb_per_s(nbytes * calls, el),
                }
            )
            print(
                f"  gemv {rows[-1]['dtype']:>8} B={batch:<3} {n:>5}x{k}: "
                f"{rows[-1]['ms']:.3f} ms, {rows[-1]['weight_GBps']:.1f} GB/s",
                flush=True,
            )
    return rows


def read_rate(seconds: float) -> float:
    t = torch.randn(256 * 2**20 // 2, dtype=torch.bfloat16)  # 256 MiB
    calls, el = time_loop(lambda: t.sum(), seconds)
    return gb_per_s(t.numel() * 2 * calls, el)


def h2d_rate(dev, seconds: float, item_mb: int = 400) -> float:
    src = torch.empty(item_mb * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=dev)
    stream = torch.cuda.Stream(dev)

    def one():
        with torch.cuda.stream(stream):
            dst.copy_(src, non_blocking=True)
        stream.synchronize()

    calls, el = time_loop(one, seconds)
    return gb_per_s(src.numel() * calls, el)


def concurrent(dev, seconds: float, batch: int, dtype: torch.dtype) -> dict:
    """Copies on a side stream (a thread keeps it busy) while the main thread multiplies."""
    src = torch.empty(400 * 2**20, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device=dev)
    stream = torch.cuda.Stream(dev)
    w = torch.randn(11008, 4096, dtype=dtype)
    x = torch.randn(batch, 4096, dtype=dtype)
    stop = threading.Event()
    copied = [0]

    def copier():
        while not stop.is_set():
            with torch.cuda.stream(stream):
                dst.copy_(src, non_blocking=True)
            stream.synchronize()
            copied[0] += src.numel()

    th = threading.Thread(target=copier, daemon=True)
    th.start()
    time.sleep(0.2)
    c0, t0 = copied[0], time.perf_counter()
    calls, el = time_loop(lambda: torch.mm(x, w.t()), seconds)
    c1, t1 = copied[0], time.perf_counter()
    stop.set()
    th.join()
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "batch": batch,
        "cpu_weight_GBps": gb_per_s(w.numel() * w.element_size() * calls, el),
        "h2d_GBps": gb_per_s(c1 - c0, t1 - t0),
    }


def round_trip_us(dev, iters: int = 200) -> dict:
    x = torch.randn(1, 4096, dtype=torch.float16, device=dev)
    host = torch.empty(1, 4096, dtype=torch.float16).pin_memory()
    ev = torch.cuda.Event()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        host.copy_(x, non_blocking=True)
        ev.record()
        ev.synchronize()
        x.copy_(host, non_blocking=True)
        times.append((time.perf_counter() - t) * 1e6)
    return {"median_us": statistics.median(times), "p90_us": sorted(times)[int(0.9 * iters)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: all cores)")
    ap.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    ap.add_argument("--quick", action="store_true", help="short measurements, CPU parts only")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = 0.2 if args.quick else args.seconds
    out: dict = {"cpu": cpu_info(), "torch": torch.__version__}
    try:
        import transformers

        out["transformers"] = transformers.__version__
    except ImportError:
        pass
    print(json.dumps(out), flush=True)
    out["cpu_read_GBps"] = read_rate(seconds)
    print(f"cpu read (sum over 256 MiB bf16): {out['cpu_read_GBps']:.1f} GB/s", flush=True)
    out["gemv"] = gemv_rates(1, seconds)
    if not args.quick:
        out["gemv_b16"] = gemv_rates(16, seconds)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        out["gpu"] = torch.cuda.get_device_name(dev)
        out["h2d_GBps"] = h2d_rate(dev, seconds)
        print(f"pinned h2d alone: {out['h2d_GBps']:.1f} GB/s", flush=True)
        out["concurrent"] = []
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for batch in (1, 16):
                r = concurrent(dev, seconds * 2, batch, dtype)
                out["concurrent"].append(r)
                print(f"  at once: {r}", flush=True)
        out["round_trip"] = round_trip_us(dev)
        print(f"gpu->host->gpu hand-off of [1, 4096] fp16: {out['round_trip']}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
