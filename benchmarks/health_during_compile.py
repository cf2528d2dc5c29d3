"""Does a 1 s health probe always answer while `hetero serve` compiles?

Starts `hetero serve CONFIG` with an empty artifact cache (so everything compiles), asks
grpc.health.v1 every 100 ms with a 1 s deadline from the moment the port is open until
`--after` seconds past SERVING, then stops the server with SIGTERM.

    .venv/bin/python benchmarks/health_during_compile.py configs/deploy/cpu-2core.yaml

`--in-thread` measures the old way for comparison: the same server, compiling in a thread
of the serving process (hetero.interfaces.serving.LoadingServable around build_compiled),
as `hetero serve` did before it compiled in a child process.

Writes benchmarks/results/health_during_compile.json (one entry per mode) and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import grpc
import yaml

HERE = Path(__file__).resolve().parent

IN_THREAD = """
import sys
from hetero.interfaces.config import load_config
from hetero.interfaces.deploy import build_compiled
from hetero.interfaces.serving import LoadingServable, ModelServable, ServerOptions
from hetero.interfaces.serving.foreground import serve_foreground
cfg = load_config(sys.argv[1])
servable = LoadingServable(lambda: ModelServable(build_compiled(cfg)), name="in-thread")
serve_foreground(servable, ServerOptions.from_config(cfg.serving, None, 0))
"""


def measure(config: Path, in_thread: bool, after: float) -> dict:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with tempfile.TemporaryDirectory() as tmp:
        data = yaml.safe_load(config.read_text())
        if str(data.get("cluster", "")).endswith((".yaml", ".yml")):
            data["cluster"] = str((config.parent / data["cluster"]).resolve())
        data["cache_dir"] = str(Path(tmp) / "cache")  # empty: everything compiles
        data.setdefault("serving", {})["port"] = 0
        cfg = Path(tmp) / "config.yaml"
        cfg.write_text(yaml.safe_dump(data))
        if in_thread:
            cmd = [sys.executable, "-c", IN_THREAD, str(cfg)]
        else:
            cmd = [sys.executable, "-c", "from hetero.interfaces.cli import main; main()",
                   "serve", str(cfg)]  # fmt: skip
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        address: list[str] = []

        def read() -> None:
            for line in proc.stderr:
                found = re.search(r"serving\s+on (\S+:\d+)", line)
                if found:
                    address.append(found.group(1))

        threading.Thread(target=read, daemon=True).start()
        while not address and proc.poll() is None:
            time.sleep(0.02)
        stub = health_pb2_grpc.HealthStub(grpc.insecure_channel(address[0]))
        t_live = time.monotonic()
        latencies, timeouts, serving_at = [], 0, None
        while serving_at is None or time.monotonic() < serving_at + after:
            t0 = time.monotonic()
            try:
                r = stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0)
                latencies.append(time.monotonic() - t0)
                if r.status == health_pb2.HealthCheckResponse.SERVING and serving_at is None:
                    serving_at = time.monotonic()
            except grpc.RpcError:
                timeouts += 1
            if time.monotonic() - t_live > 900:
                break
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    latencies.sort()
    return {
        "mode": "compile in a thread of the server"
        if in_thread
        else "hetero serve (child process)",
        "probes": len(latencies) + timeouts,
        "timeouts": timeouts,
        "max_ms": latencies[-1] * 1e3,
        "p99_ms": latencies[int(0.99 * (len(latencies) - 1))] * 1e3,
        "live_to_serving_s": (serving_at or time.monotonic()) - t_live,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path, nargs="?", default=Path("configs/deploy/cpu-2core.yaml"))
    ap.add_argument("--after", type=float, default=5.0, help="seconds probed after SERVING")
    ap.add_argument("--in-thread", action="store_true", help="also measure the old way")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "health_during_compile.json")
    args = ap.parse_args()
    rows = [measure(args.config, False, args.after)]
    if args.in_thread:
        rows.append(measure(args.config, True, args.after))
    for r in rows:
        print(json.dumps(r))
    meta = {
        "date": date.today().isoformat(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, loaded)",
        "command": f".venv/bin/python benchmarks/health_during_compile.py {args.config}"
        + (" --in-thread" if args.in_thread else ""),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    lines = [
        "# Health while compiling: every 1 s probe must answer",
        "",
        f"`{meta['command']}` — {meta['date']}, {meta['machine']}.",
        "A fresh artifact cache, so the whole model compiles; probes every 100 ms with a 1 s",
        "deadline from the moment the port is open to 5 s after SERVING. Measured on the shared",
        "2-core development machine while other sessions ran: the slowest answers are an upper",
        "bound.",
        "",
        "| mode | probes | timed out (> 1 s) | slowest ms | p99 ms | live -> SERVING s |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *(
            f"| {r['mode']} | {r['probes']} | {r['timeouts']} | {r['max_ms']:.0f} | "
            f"{r['p99_ms']:.0f} | {r['live_to_serving_s']:.1f} |"
            for r in rows
        ),
        "",
        "In a thread, compiling holds the GIL for long stretches (importing TVM maps its",
        "libraries for 1.6 s, TVM's FFI registration and passes for hundreds of ms).",
        "`hetero serve` imports the backends' runtimes before the port opens and compiles in a",
        "child process; the server only loads the cached artifacts. The price: the child",
        "imports torch and TVM again and the model is captured twice, so SERVING comes later.",
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
