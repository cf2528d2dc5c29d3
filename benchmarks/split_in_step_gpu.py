"""Where a split layer's CPU rows lose their calibrated rate inside a decode step (issue 14).

Every GPU host measured ran them 11-100% slower in a step than `calibration/split.py`
measures them (the launching thread's own products beside the link), while whole CPU layers,
on the launching thread, ran at ~93% of their price. This runs a LLaMA-7B layer's split
shares (47% of each matrix's rows on the CPU, float16) as a decode step runs them:
overlapped hand-offs, one TorchScript task thread whose OpenMP team multiplies while the
launching thread queues the GPU's work, a short GPU kernel between hand-offs for the
attention, the link streaming on a side stream; the hand-offs timed on the GPU's timeline
(`HandoffClock`). Each variant runs in a process of its own, since OpenMP reads its settings
once and sizes a thread's team when the thread first asks:

- `as-run`: the environment the benchmarks run in (no OpenMP variable set);
- `passive`: hetero's CLI default (OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0);
- `active`: OMP_WAIT_POLICY=ACTIVE;
- `half`: 8 threads for the launching thread (its team 8, the task's 7): libgomp spins only
  100 times before sleeping once a process's OpenMP threads outnumber its cores, which the
  launching thread's team and the task's together do at 16 + 15;
- `main1`: the launching thread's team cut to 1 after the task thread starts (the task's
  team alone is the process's OpenMP threads);
- `no-link`: `as-run` without the side stream's copies.

    python benchmarks/split_in_step_gpu.py --json $OUT/split_in_step.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HIDDEN, QKV, INTER = 4096, 3 * 4096, 11008
CPU_SHARE = 0.47
VARIANTS = {
    "as-run": ({}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0"}, []),
    "active": ({"OMP_WAIT_POLICY": "ACTIVE"}, []),
    "half": ({}, ["--threads", "8"]),
    "main1": ({}, ["--main-threads-after", "1"]),
    "no-link": ({}, ["--no-link"]),
}


def _split(rows: int) -> tuple[int, int]:
    cpu = int(rows * CPU_SHARE) // 64 * 64
    return rows - cpu, cpu


def _weights(rows: int, cols: int, dev: torch.device, host: bool) -> torch.Tensor:
    # made on the GPU (the host's randn is slow) and scaled so that values stay normal
    w = torch.randn(rows, cols, device=dev, dtype=torch.float16) * 0.02
    return w.cpu() if host else w


def build(layers: int, dev: torch.device) -> list[dict]:
    """Per layer, (GPU share, CPU share) of the q/k/v rows, o's rows and the gated MLP's
    features, laid out as runtime/split_linear.py cuts them (`mlp_share`'s layout)."""
    out = []
    for _ in range(layers):
        qg, qc = _split(QKV)
        og, oc = _split(HIDDEN)
        mg, mc = _split(INTER)
        out.append(
            {
                "qkv": (_weights(qg, HIDDEN, dev, False), _weights(qc, HIDDEN, dev, True)),
                "o": (_weights(og, HIDDEN, dev, False), _weights(oc, HIDDEN, dev, True)),
                "mlp": (_weights(3 * mg, HIDDEN, dev, False), _weights(3 * mc, HIDDEN, dev, True)),
            }
        )
    return out


def step(layers: list[dict], x: torch.Tensor, attention_cycles: int) -> torch.Tensor:
    from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm

    for lay in layers:
        q = gpu_cpu_mm(x, *lay["qkv"])
        torch.cuda._sleep(attention_cycles)  # the attention against the cache
        a = torch.cat([q[0], q[1]], dim=1)[:, :HIDDEN]
        o = gpu_cpu_mm(F.normalize(a, dim=-1), *lay["o"])
        h = F.normalize(torch.cat([o[0], o[1]], dim=1), dim=-1)
        x = F.normalize(gpu_cpu_mlp(h, *lay["mlp"], "silu", True), dim=-1)
    return x


def child(args) -> dict:
    from hetero.backends import gpu_cpu_mm as gcm
    from hetero.calibration.split import COPY_BYTES, copy_sources, rates_at_once

    if args.threads:
        torch.set_num_threads(args.threads)
    dev = torch.device("cuda", 0)
    layers = build(args.layers, dev)
    cpu_bytes = {
        k: sum(lay[k][1].numel() * 2 for lay in layers) / args.layers for k in ("qkv", "o", "mlp")
    }
    per_layer = sum(cpu_bytes.values())
    sources = copy_sources(1 << 30)
    x1 = torch.randn(1, HIDDEN, dtype=torch.float16)
    gemv_weights = [lay["qkv"][1] for lay in layers]

    def calibrated() -> tuple[float, float]:
        """The calibration's measurement: the launching thread's products beside the link."""
        return rates_at_once(dev, gemv_weights, x1, sources, args.seconds, 55e9)

    out: dict = {
        "threads": torch.get_num_threads(),
        "env": {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")},
        "cpu_MB_per_layer": per_layer / 1e6,
    }
    out["calibrated_GBps"], out["calibrated_link_GBps"] = (r / 1e9 for r in calibrated())
    x = torch.randn(1, HIDDEN, device=dev, dtype=torch.float16)
    with gcm.overlapped():
        step(layers, x, args.attention_cycles)  # compiles the tasks, starts the task thread
    torch.cuda.synchronize()
    if args.main_threads_after:
        torch.set_num_threads(args.main_threads_after)
    out["task_team"] = "threads at its start: " + str(torch.get_num_threads())
    clock = gcm.HandoffClock()
    link = torch.cuda.Stream(dev)
    dst = torch.empty(COPY_BYTES, dtype=torch.uint8, device=dev)
    spans: dict[str, list[float]] = {"qkv": [], "o": [], "mlp": []}
    walls, link_rates = [], []
    with gcm.overlapped():
        step(layers, x, args.attention_cycles)  # the chain exists from here
        for _ in range(args.steps):
            gcm.settle(dev)
            torch.cuda.synchronize()
            if not args.no_link:  # more than a step takes
                with torch.cuda.stream(link):
                    a, b = (
                        torch.cuda.Event(enable_timing=True),
                        torch.cuda.Event(enable_timing=True),
                    )
                    a.record(link)
                    for k in range(4):
                        dst.copy_(sources[k % len(sources)], non_blocking=True)
                    b.record(link)
            clock.start(dev)
            t0 = time.perf_counter()
            step(layers, x, args.attention_cycles)
            gcm.settle(dev)
            torch.cuda.current_stream(dev).synchronize()
            walls.append((time.perf_counter() - t0) * 1e3)
            got = clock.spans()
            clock.stop()
            for i, ms in enumerate(got):
                spans[("qkv", "o", "mlp")[i % 3]].append(ms)
            if not args.no_link:
                b.synchronize()
                link_rates.append(4 * COPY_BYTES / (a.elapsed_time(b) / 1e3) / 1e9)
    out["calibrated_after_GBps"] = calibrated()[0] / 1e9
    out["step_wall_ms"] = statistics.median(walls)
    per_kind = {}
    for k, v in spans.items():
        ms = statistics.median(v)
        per_kind[k] = {"span_ms": ms, "GBps": cpu_bytes[k] / (ms / 1e3) / 1e9}
    out["per_product"] = per_kind
    layer_ms = sum(p["span_ms"] for p in per_kind.values())
    out["in_step_GBps"] = per_layer / (layer_ms / 1e3) / 1e9
    out["in_step_over_calibrated"] = out["calibrated_GBps"] / out["in_step_GBps"]
    if link_rates:
        out["link_in_step_GBps"] = statistics.median(link_rates)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--layers", type=int, default=16, help="split layers per step")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=1.0, help="the calibration's window")
    ap.add_argument("--attention-cycles", type=int, default=60_000)
    ap.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--main-threads-after", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--no-link", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return
    results = {}
    for name in args.variants:
        env_add, extra = VARIANTS[name]
        env = {**os.environ, **env_add}
        cmd = [sys.executable, __file__, "--child", "--layers", str(args.layers)]
        cmd += ["--steps", str(args.steps), "--seconds", str(args.seconds)]
        cmd += ["--attention-cycles", str(args.attention_cycles), *extra]
        t = time.perf_counter()
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        if p.returncode != 0:
            results[name] = {"error": p.stderr[-2000:]}
        else:
            results[name] = json.loads(p.stdout.strip().splitlines()[-1])
        r = results[name]
        print(
            f"[{time.perf_counter() - t:5.1f}s] {name}: "
            + (
                r["error"][-400:]
                if "error" in r
                else f"in step {r['in_step_GBps']:.1f} GB/s against {r['calibrated_GBps']:.1f} "
                f"calibrated ({r['in_step_over_calibrated']:.2f}x), after "
                f"{r['calibrated_after_GBps']:.1f}; step {r['step_wall_ms']:.2f} ms; "
                + ", ".join(f"{k} {v['GBps']:.1f}" for k, v in r["per_product"].items())
                + f"; link {r.get('link_in_step_GBps', 0):.1f}"
            ),
            flush=True,
        )
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
