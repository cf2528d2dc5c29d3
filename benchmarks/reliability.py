"""Soak: a served model keeps every request while a worker is killed and a device is
removed for good, and every health check answers within 1 s.

On a two-node Ray cluster on this machine (`ray.cluster_utils`: a head and a node labelled
`far`), the demo model is compiled for two hosts with part of it pinned to `far`, served
over gRPC (hetero's server around the Ray executor), and driven by `--clients` threads
until `--requests` answers came back; each answer is checked against eager. Meanwhile a
probe asks grpc.health.v1 every 100 ms with a 1 s deadline. At a quarter of the requests
the worker of `far/cpu` is killed (Ray restarts it); at 60% the `far` node is removed
for good, so the executor re-plans over the head alone.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/reliability.py --requests 10000

Writes benchmarks/results/reliability.json and .md. "Lost" counts every request that did
not come back OK with the right answer (any status code other than OK, or a wrong answer).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import threading
import time
from collections import Counter
from datetime import date
from pathlib import Path

import grpc
import torch

HERE = Path(__file__).resolve().parent
CPU = {"kind": "cpu", "cores": 1, "bandwidth": "20 GB/s", "memory": "4 GB"}
SPEC = {
    "name": "head-and-far",
    "hosts": [
        {"name": "head", "devices": [{"name": "cpu", **CPU}]},
        {"name": "far", "devices": [{"name": "cpu", **CPU}]},
    ],
    "network": {"bandwidth": "1 GB/s", "latency": "100 us"},
}


class Probe(threading.Thread):
    def __init__(self, client) -> None:
        super().__init__(daemon=True)
        self.client = client
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.transitions: list[tuple[float, str]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                status = self.client.health(timeout=1.0)
                self.latencies.append(time.monotonic() - t0)
                if not self.transitions or self.transitions[-1][1] != status:
                    self.transitions.append((t0, status))
            except grpc.RpcError as e:
                self.failures.append(f"{e.code().name} after {time.monotonic() - t0:.2f} s")
            time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--backend", default="tvm", help="backend for the CPUs (tvm or eager)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "reliability.json")
    args = ap.parse_args()

    import ray
    from ray.cluster_utils import Cluster

    import hetero
    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.models import tiny_gpt
    from hetero.interfaces.serving import (
        HeteroServer,
        InferenceClient,
        ModelServable,
        ServerOptions,
    )
    from hetero.runtime.placement import HOST_LABEL

    small = {"object_store_memory": 100 * 2**20}
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, **small},
    )
    far = cluster.add_node(num_cpus=1, labels={HOST_LABEL: "far"}, **small)
    cluster.wait_for_nodes(timeout=60)

    model, (example,) = tiny_gpt(batch=1, seq=64)
    spec = ClusterSpec.from_dict(SPEC)
    started = time.monotonic()
    cm = hetero.compile(
        model,
        (example,),
        cluster=spec,
        backends={"cpu": args.backend},
        executor="ray",
        pins={"blocks.2": "far/cpu", "blocks.3": "far/cpu"},
    )
    compile_s = time.monotonic() - started
    devices_before = sorted({s.device.name for s in cm.executor.stages})
    server = HeteroServer(
        ModelServable(cm, name="tiny-gpt"),
        ServerOptions(port=0, workers=1, queue_limit=64, deadline=180, health_poll=0.1),
    )
    server.start()
    client = InferenceClient(server.address)
    assert client.wait_serving(timeout=120)

    gen = torch.Generator().manual_seed(0)
    cases = [torch.randint(0, 512, (1, 64), generator=gen) for _ in range(16)]
    with torch.no_grad():
        expected = [model(x) for x in cases]

    lock = threading.Lock()
    sent = Counter()
    codes: Counter = Counter()
    wrong = 0
    latencies: list[float] = []
    answered: list[float] = []  # monotonic time of every OK answer

    def load(seed: int) -> None:
        nonlocal wrong
        i = seed
        while True:
            with lock:
                if sent["n"] >= args.requests:
                    return
                sent["n"] += 1
            x, want = cases[i % len(cases)], expected[i % len(expected)]
            i += args.clients
            t0 = time.monotonic()
            try:
                got = client.infer({"idx": x}, timeout=180)["output0"]
                ok = torch.allclose(got, want, rtol=1e-4, atol=1e-4)
                code = "OK"
            except grpc.RpcError as e:
                ok, code = False, e.code().name
            t1 = time.monotonic()
            with lock:
                codes[code] += 1
                if code == "OK":
                    latencies.append(t1 - t0)
                    answered.append(t1)
                    wrong += int(not ok)

    probe = Probe(client)
    probe.start()
    events: list[tuple[str, float]] = []
    threads = [threading.Thread(target=load, args=(k,), daemon=True) for k in range(args.clients)]
    t_start = time.monotonic()
    for t in threads:
        t.start()

    def wait_until(fraction: float) -> None:
        while sum(codes.values()) < fraction * args.requests and any(t.is_alive() for t in threads):
            time.sleep(0.05)

    wait_until(0.25)
    ray.kill(cm.executor.workers["far/cpu"], no_restart=False)
    events.append(("worker of far/cpu killed (Ray restarts it)", time.monotonic()))
    wait_until(0.60)
    cluster.remove_node(far)
    events.append(("node far removed for good", time.monotonic()))
    for t in threads:
        t.join()
    elapsed = time.monotonic() - t_start
    probe.stop.set()
    probe.join(timeout=5)
    devices_after = sorted({s.device.name for s in cm.executor.stages})

    def stall_after(t_event: float) -> float:
        """Longest gap between OK answers in the 120 s after an event."""
        times = sorted(a for a in answered if a >= t_event - 1)
        window = [a for a in times if a <= t_event + 120]
        gaps = [b - a for a, b in itertools.pairwise(window)]
        return max(gaps, default=0.0)

    total = sum(codes.values())
    lost = total - codes["OK"] + wrong
    lat_ms = sorted(x * 1e3 for x in latencies)
    health_ms = sorted(x * 1e3 for x in probe.latencies)
    result = {
        "meta": {
            "date": date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores (shared, loaded)",
            "command": "OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/reliability.py "
            f"--requests {args.requests} --clients {args.clients} --backend {args.backend}",
            "ray": ray.__version__,
            "torch": torch.__version__,
        },
        "compile_s": compile_s,
        "devices_before": devices_before,
        "devices_after": devices_after,
        "requests": total,
        "clients": args.clients,
        "ok": codes["OK"],
        "codes": dict(codes),
        "wrong": wrong,
        "lost": lost,
        "elapsed_s": elapsed,
        "throughput_rps": total / elapsed,
        "latency_ms": {
            "p50": statistics.median(lat_ms),
            "p99": lat_ms[int(0.99 * (len(lat_ms) - 1))],
            "max": lat_ms[-1],
        },
        "health": {
            "answers": len(probe.latencies),
            "failures": probe.failures,
            "p99_ms": health_ms[int(0.99 * (len(health_ms) - 1))],
            "max_ms": health_ms[-1],
            "transitions": [(round(t - t_start, 2), s) for t, s in probe.transitions],
        },
        "events": [
            {"event": e, "at_s": round(t - t_start, 2), "longest_stall_s": round(stall_after(t), 2)}
            for e, t in events
        ],
        "history": len(cm.executor.history),
        "final_status": list(cm.status()),
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(result))
    client.close()
    server.shutdown(grace=5)
    ray.shutdown()
    cluster.shutdown()


def markdown(r: dict) -> str:
    h = r["health"]
    lines = [
        "# Reliability soak: a worker killed, a device removed for good, under load",
        "",
        f"`{r['meta']['command']}` — {r['meta']['date']}, {r['meta']['machine']}, "
        f"Ray {r['meta']['ray']}, torch {r['meta']['torch']}.",
        "Measured on the shared 2-core development machine while other sessions were running:",
        "the counts are the result, the times are an upper bound of what a quiet machine gives.",
        "",
        "The demo model (tiny_gpt, 1 x 64 tokens) on two Ray nodes of this machine, blocks 2-3",
        "pinned to `far/cpu`, served by hetero's gRPC server; every answer is checked against",
        "eager. At 25% of the requests the worker of `far/cpu` is killed (Ray restarts it); at",
        "60% the node `far` is removed for good and the executor re-plans over `head/cpu`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| requests | {r['requests']} from {r['clients']} clients |",
        f"| answered OK and right | {r['ok'] - r['wrong']} |",
        f"| lost (any other code, or a wrong answer) | **{r['lost']}** |",
        f"| status codes | {', '.join(f'{k}: {v}' for k, v in sorted(r['codes'].items()))} |",
        f"| devices before / after | {', '.join(r['devices_before'])} / "
        f"{', '.join(r['devices_after'])} |",
        f"| throughput | {r['throughput_rps']:.0f} requests/s over {r['elapsed_s']:.1f} s |",
        f"| latency p50 / p99 / max | {r['latency_ms']['p50']:.1f} / {r['latency_ms']['p99']:.1f}"
        f" / {r['latency_ms']['max']:.0f} ms |",
        f"| health checks (1 s deadline, every 100 ms) | {h['answers']} answered, "
        f"{len(h['failures'])} failed; p99 {h['p99_ms']:.1f} ms, max {h['max_ms']:.0f} ms |",
        f"| health states over time (s: state) | "
        f"{', '.join(f'{t:g}: {s}' for t, s in h['transitions'])} |",
        *(
            f"| {e['event']} at {e['at_s']:g} s | longest gap between answers "
            f"{e['longest_stall_s']:g} s |"
            for e in r["events"]
        ),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
