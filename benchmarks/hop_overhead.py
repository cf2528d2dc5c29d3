"""Per-hop overhead of hetero's runtime against a bare Ray Compiled Graph hop.

Three pipelines of two actors (driver -> A -> B -> driver), same node:
  bare-identity  actors return their input: the compiled graph's own cost
  bare-runner    actors call the same eager artifacts hetero runs: the compute baseline
  hetero         RayExecutor over those artifacts (packets, metrics, checks)
plus a plain actor call chain (no compiled graph) for scale, and pipelined throughput.
The bar: hetero's round trip within 1.5x of bare-runner's.

    python benchmarks/hop_overhead.py [--iters 300] [--json benchmarks/results/hop_overhead.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch
from ray.dag import InputNode

from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner.graph import capture
from hetero.partitioner.split import split
from hetero.runtime.artifacts import load_runner
from hetero.runtime.build import compile_partitions, needed_outputs
from hetero.runtime.pipeline import measure_throughput
from hetero.runtime.ray_executor import RayExecutor

CLUSTER = {
    "name": "bench",
    "hosts": [
        {
            "name": "local",
            "devices": [
                {
                    "name": "cpu",
                    "kind": "cpu",
                    "cores": 1,
                    "bandwidth": "20 GB/s",
                    "memory": "4 GB",
                },
                {"name": "npu", "kind": "npu", "bandwidth": "20 GB/s", "memory": "2 GB"},
            ],
            "links": [{"between": ["cpu", "npu"], "bandwidth": "8 GB/s"}],
        }
    ],
}


class TwoOps(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x + 1.0) * 2.0


@ray.remote(num_cpus=0)
class Bare:
    def __init__(self, artifact=None, device=None) -> None:
        self.run = load_runner(artifact, device, default_registry()) if artifact else None

    def identity(self, x):
        return x

    def runner(self, x):
        return self.run(x)[0]


def timed(fn, iters: int) -> dict:
    for _ in range(max(5, iters // 10)):
        fn()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    return summary(samples)


def paired(fa, fb, iters: int, block: int = 20) -> tuple[dict, dict]:
    for _ in range(10):
        fa()
        fb()
    sa: list[float] = []
    sb: list[float] = []
    while len(sa) < iters:
        for fn, out in ((fa, sa), (fb, sb)):
            for _ in range(block):
                t0 = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t0) * 1e6)
    return summary(sa), summary(sb)


def summary(samples: list[float]) -> dict:
    return {
        "median_us": statistics.median(samples),
        "p90_us": statistics.quantiles(samples, n=10)[-1],
        "iters": len(samples),
    }


def compiled_chain(a, b, method: str):
    with InputNode() as inp:
        out = getattr(b, method).bind(getattr(a, method).bind(inp))
    return out.experimental_compile()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=300)
    ap.add_argument("--sizes", default="256,65536,262144", help="float32 elements per activation")
    ap.add_argument("--json", default="benchmarks/results/hop_overhead.json")
    args = ap.parse_args()
    ray.init(num_cpus=4, resources={"NPU": 1}, include_dashboard=False, log_to_driver=False)
    cluster = ClusterSpec.from_dict(CLUSTER)
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(1, n)
        graph = capture(TwoOps(), (x,))
        order = graph.order
        parts = split(graph, {name: int(i >= len(order) // 2) for i, name in enumerate(order)})
        devs = [cluster.device("local/cpu"), cluster.device("local/npu")]
        stages = compile_partitions(
            graph,
            parts,
            [(d, "eager") for d in devs],
            tempfile.mkdtemp(prefix="hop-"),
            registry=default_registry(),
        )
        inputs = dict(zip(graph.inputs, (x,), strict=True))
        row = {"elements": n, "bytes": n * 4, "hops": 3}
        # Fresh actors per graph: teardown(kill_actors=True) because Ray 2.60's teardown
        # can wait forever on actors that moved payloads over ~1 MB.
        a, b = (Bare.remote(None, d) for d in devs)
        ray.get([w.identity.remote(0) for w in (a, b)], timeout=120)
        g = compiled_chain(a, b, "identity")
        row["bare_identity"] = timed(lambda g=g, x=x: ray.get(g.execute(x), timeout=30), args.iters)
        g.teardown(kill_actors=True)
        a, b = (Bare.remote(s.artifact, d) for s, d in zip(stages, devs, strict=True))
        ray.get([w.identity.remote(0) for w in (a, b)], timeout=120)
        row["plain_actor_calls"] = timed(
            lambda a=a, b=b, x=x: ray.get(b.runner.remote(a.runner.remote(x)), timeout=30),
            max(20, args.iters // 5),
        )
        bare = compiled_chain(a, b, "runner")
        ex = RayExecutor(
            stages, needed_outputs(graph), cluster=cluster, max_inflight=4, restart_timeout_s=5
        )
        # Interleaved in blocks so both see the same load on a shared machine.
        row["bare_runner"], row["hetero"] = paired(
            lambda bare=bare, x=x: ray.get(bare.execute(x), timeout=30),
            lambda ex=ex, inputs=inputs: ex.run(inputs),
            args.iters,
        )
        bare.teardown(kill_actors=True)
        tp = measure_throughput(ex, [inputs] * 64, compare_sequential=True)
        row["pipelined_per_s"] = tp.per_s
        row["sequential_per_s"] = tp.sequential_per_s
        ex.shutdown()
        row["ratio_vs_bare_runner"] = row["hetero"]["median_us"] / row["bare_runner"]["median_us"]
        row["overhead_per_hop_us"] = (
            row["hetero"]["median_us"] - row["bare_runner"]["median_us"]
        ) / row["hops"]
        rows.append(row)
    ray.shutdown()
    head = (
        f"{'bytes':>9} {'bare id us':>11} {'bare run us':>12} {'hetero us':>10} "
        f"{'ratio':>6} {'+us/hop':>8} {'actor call us':>14} {'pipe/s':>8} {'seq/s':>8}"
    )
    print(head)
    for r in rows:
        print(
            f"{r['bytes']:>9} {r['bare_identity']['median_us']:>11.0f} "
            f"{r['bare_runner']['median_us']:>12.0f} {r['hetero']['median_us']:>10.0f} "
            f"{r['ratio_vs_bare_runner']:>6.2f} {r['overhead_per_hop_us']:>8.0f} "
            f"{r['plain_actor_calls']['median_us']:>14.0f} {r['pipelined_per_s']:>8.1f} "
            f"{r['sequential_per_s']:>8.1f}"
        )
    meta = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}",
        "ray": ray.__version__,
        "torch": torch.__version__,
        "iters": args.iters,
    }
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
