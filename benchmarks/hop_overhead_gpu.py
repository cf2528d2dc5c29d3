"""GPU<->CPU hops: hetero's RayExecutor against a bare Ray Compiled Graph and the pinned copy.

Every configuration runs in its own child process (its own ray.init / shutdown), so bare
actors and hetero's GPU worker never share a Ray instance or the GPU, and a child that
hangs (Ray 2.60 can block in a compiled graph's teardown) is killed by a hard timeout and
reported; the parent starts a fresh child for the sizes still to do.

Configurations (driver = this process's child; one request = one round trip):
  copy        torch only: pinned and pageable host<->device copies of the activation
  bare_id     driver -> GPU actor (returns its input) -> driver: Ray's own 2-hop cost
  bare_move   driver -> GPU actor (x.cuda() then .cpu()) -> driver: Ray + both copies
  bare_cg     driver -> CPU actor -> GPU actor -> driver, the actors running the same eager
              artifacts hetero runs: the fair baseline of hetero_cg
  hetero_cg   RayExecutor over a 2-partition plan: CPU partition, then GPU partition
  bare_gc     driver -> GPU actor -> CPU actor -> driver (same artifacts)
  hetero_gc   RayExecutor: GPU partition, then CPU partition
The model is `(x + 1) * 2` cut in two; every pipeline has 3 hops, one of them GPU<->CPU
inside the graph (cg: CPU->GPU; gc: GPU->CPU) and one to/from the GPU at the driver.
Bar (issue 6): hetero within 1.5x of its bare compiled graph.

    python benchmarks/hop_overhead_gpu.py --json out.json   # GPU box (CPU: a smoke test
                                                             # with an emulated NPU for the GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bounded import run_bounded

from hetero.runtime.faults import bounded

CONFIGS = ("copy", "bare_id", "bare_move", "bare_cg", "hetero_cg", "bare_gc", "hetero_gc")
PAIRS = (("bare_cg", "hetero_cg"), ("bare_gc", "hetero_gc"))
HOPS = 3


# ---- child -----------------------------------------------------------------------------------


def summary(samples: list[float]) -> dict:
    return {
        "median_us": statistics.median(samples),
        "p10_us": statistics.quantiles(samples, n=10)[0],
        "p90_us": statistics.quantiles(samples, n=10)[-1],
        "iters": len(samples),
    }


def timed(fn, iters: int, sync=None) -> dict:
    for _ in range(max(10, iters // 10)):
        fn()
    if sync:
        sync()
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        samples.append((time.perf_counter() - t0) * 1e6)
    return summary(samples)


def cluster_spec(gpu: bool):
    from hetero.cluster.spec import ClusterSpec

    acc = (
        {"name": "gpu", "kind": "gpu", "bandwidth": "3.35 TB/s", "memory": "80 GB"}
        if gpu
        else {"name": "npu", "kind": "npu", "bandwidth": "20 GB/s", "memory": "2 GB"}
    )
    return ClusterSpec.from_dict(
        {
            "name": "hop-gpu",
            "hosts": [
                {
                    "name": "local",
                    "devices": [
                        {
                            "name": "cpu",
                            "kind": "cpu",
                            "cores": 1,
                            "bandwidth": "20 GB/s",
                            "memory": "8 GB",
                        },
                        acc,
                    ],
                    "links": [{"between": ["cpu", acc["name"]], "bandwidth": "54.6 GB/s"}],
                }
            ],
        }
    )


def child_copy(sizes: list[int], iters: int, emit) -> None:
    import torch

    if not torch.cuda.is_available():
        for n in sizes:
            emit(n, {"skipped": "no CUDA"})
        return
    sync = torch.cuda.synchronize

    def copies(n: int, iters: int = iters) -> dict:
        pinned = torch.empty(n, dtype=torch.uint8).pin_memory()
        pageable = torch.empty(n, dtype=torch.uint8)
        dev = torch.empty(n, dtype=torch.uint8, device="cuda")
        return {
            "pinned_h2d": timed(lambda: dev.copy_(pinned, non_blocking=True), iters, sync),
            "pinned_d2h": timed(lambda: pinned.copy_(dev, non_blocking=True), iters, sync),
            "pageable_h2d": timed(lambda: dev.copy_(pageable), iters, sync),
            "pageable_d2h": timed(lambda: pageable.copy_(dev), iters, sync),
        }

    rows = {n: copies(n) for n in sizes}
    big = copies(2**30, 5)["pinned_h2d"]
    gbps = 2**30 / big["median_us"] / 1e3
    for n in sizes:
        emit(n, {**rows[n], "pinned_h2d_GBps_1GiB": gbps})


def child_ray(config: str, sizes: list[int], iters: int, emit) -> None:
    import ray
    import torch
    from ray.dag import InputNode

    from hetero.backends.registry import default_registry
    from hetero.runtime.artifacts import load_runner
    from hetero.runtime.build import compile_partitions, needed_outputs
    from hetero.runtime.ray_executor import RayExecutor

    gpu = torch.cuda.is_available()
    acc_name = "local/gpu" if gpu else "local/npu"
    cluster = cluster_spec(gpu)
    # bare actors take a sliver of the GPU (Ray then exposes it to them); hetero's worker
    # asks for the whole GPU, which is why bare and hetero never share one Ray instance
    gpu_opts = {"num_gpus": 0.1} if gpu else {"resources": {"NPU": 0.1}}
    ray.init(
        num_cpus=4,
        num_gpus=1 if gpu else 0,
        resources=None if gpu else {"NPU": 1},
        include_dashboard=False,
        log_to_driver=False,
    )

    @ray.remote(num_cpus=0)
    class Bare:
        def __init__(self, artifact=None, device=None) -> None:
            self.run = load_runner(artifact, device, default_registry()) if artifact else None

        def identity(self, x):
            return x

        def move(self, x):
            # the GPU<->CPU hop Ray leaves to the actor: to the device and back, synchronised
            return x.to("cuda").cpu() if gpu else x.clone()

        def runner(self, x):
            out = self.run(x)[0]
            return out.cpu() if out.is_cuda else out

    import hetero
    from hetero.partitioner.split import split

    class TwoOps(torch.nn.Module):
        def forward(self, x):
            return (x + 1.0) * 2.0

    for n in sizes:
        x = torch.randn(n // 4)
        row: dict = {}
        it = iters if n < 2**24 else max(20, iters // 5)  # 64 MiB: tens of ms a trip
        teardown = None
        if config in ("bare_id", "bare_move"):
            a = Bare.options(**gpu_opts).remote()
            ray.get(a.identity.remote(0), timeout=120)
            with InputNode() as inp:
                out = getattr(a, config.removeprefix("bare_").replace("id", "identity")).bind(inp)
            g = out.experimental_compile()
            row[config] = timed(lambda g=g, x=x: ray.get(g.execute(x), timeout=30), it)
            row["hops"] = 2

            teardown = None  # left up: the child's exit ends it (a teardown can block 30 s)

        else:
            order = ("cpu", acc_name) if config.endswith("_cg") else (acc_name, "cpu")
            devs = [cluster.device(d if "/" in d else f"local/{d}") for d in order]
            graph = hetero.capture(TwoOps(), (x,))
            ops = graph.order
            parts = split(graph, {o: int(i >= len(ops) // 2) for i, o in enumerate(ops)})
            stages = compile_partitions(
                graph,
                parts,
                [(d, "eager") for d in devs],
                tempfile.mkdtemp(prefix="hopgpu-"),
                registry=default_registry(),
            )
            row["hops"] = HOPS
            if config.startswith("bare"):
                actors = [
                    Bare.options(**(gpu_opts if d.kind != "cpu" else {})).remote(s.artifact, d)
                    for s, d in zip(stages, devs, strict=True)
                ]
                ray.get([w.identity.remote(0) for w in actors], timeout=120)
                with InputNode() as inp:
                    out = actors[1].runner.bind(actors[0].runner.bind(inp))
                g = out.experimental_compile()
                row[config] = timed(lambda g=g, x=x: ray.get(g.execute(x), timeout=30), it)

                teardown = None

            else:
                ex = RayExecutor(
                    stages,
                    needed_outputs(graph),
                    cluster=cluster,
                    max_inflight=1,
                    restart_timeout_s=5,
                    export_metrics=False,
                )
                inputs = dict(zip(graph.inputs, (x,), strict=True))
                got = next(iter(ex.run(inputs).values()))
                row["correct"] = bool(torch.allclose(got.cpu(), (x + 1.0) * 2.0))
                row["result_device"] = str(got.device)
                row[config] = timed(lambda ex=ex, i=inputs: ex.run(i), it)
                stage_ms = ex.measured_ms()
                row["stage_ms"] = {str(k): v for k, v in stage_ms.items()}
                row["worker_pids"] = {d: i["pid"] for d, i in ex.worker_info.items()}
                teardown = ex.shutdown
        emit(n, row)
        if teardown is not None and not bounded(teardown, 15, "executor teardown"):
            emit(n, {**row, "teardown": "did not finish in 15 s; child stops here"})
            return


def child_main(args) -> None:
    out = Path(args.child_json)
    results: dict = {}

    def emit(n: int, row: dict) -> None:
        results[str(n)] = row
        out.write_text(json.dumps(results, indent=1))

    sizes = [int(s) for s in args.sizes.split(",")]
    if args.child == "copy":
        child_copy(sizes, args.iters, emit)
    else:
        child_ray(args.child, sizes, args.iters, emit)
        import ray

        bounded(ray.shutdown, 5, "ray.shutdown")
    sys.stdout.flush()
    os._exit(0)  # a Ray thread blocked in a channel read must not keep the child alive


# ---- parent ------------------------------------------------------------------------------------


def run_child(config: str, sizes: list[int], iters: int, timeout: float) -> dict:
    """Run one configuration over `sizes`; a child that hangs or dies is killed and the sizes
    it left are tried in a fresh child (the one it was on is reported as failed)."""
    results: dict = {}
    pending = list(sizes)
    while pending:
        cmd = [
            sys.executable,
            os.path.abspath(__file__),
            "--child",
            config,
            "--sizes",
            ",".join(map(str, pending)),
            "--iters",
            str(iters),
        ]
        t0 = time.perf_counter()
        got, why, _ = run_bounded(cmd, timeout)
        got = {int(k): v for k, v in got.items()}
        results.update(got)
        wall = time.perf_counter() - t0
        done = [s for s in pending if s in got]
        print(f"  [{config}] sizes {done} in {wall:.1f} s {why}", flush=True)
        rest = [s for s in pending if s not in got]
        if rest and (why or not done):  # the size it was on failed; go on with the others
            results[rest[0]] = {"failed": why or "child exited without a result"}
            rest = rest[1:]
        # else: the child stopped early on its own (a teardown that did not finish)
        pending = rest
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default="4096,262144,4194304,67108864", help="bytes (float32)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--timeout", type=float, default=150.0, help="seconds per child")
    ap.add_argument("--json", default="benchmarks/results/hop_overhead_gpu.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child_main(args)
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    by_config: dict = {}
    meta = {"command": " ".join(sys.argv), "iters": args.iters}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    for config in args.configs.split(","):
        by_config[config] = run_child(config, sizes, args.iters, args.timeout)
        rows = [{"bytes": n, **{c: r.get(n, {}) for c, r in by_config.items()}} for n in sizes]
        for n in sizes:  # the log keeps what a run that is cut off measured
            print(f"    {config} {n}: {json.dumps(by_config[config].get(n, {}))}", flush=True)
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    meta.update(environment())
    Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=str))
    print_table(meta, rows)
    print(f"wrote {args.json}")


def med(row: dict, config: str) -> float | None:
    r = row.get(config, {}).get(config)
    return r["median_us"] if r else None


def print_table(meta: dict, rows: list[dict]) -> None:
    print(f"\n{meta['card']}; ray {meta['ray']}, torch {meta['torch']}; medians in us")
    cols = ["bare_id", "bare_move", "bare_cg", "hetero_cg", "bare_gc", "hetero_gc"]
    print(
        f"{'bytes':>9} {'pin h2d':>8} {'pin d2h':>8} {'pg h2d':>8} {'pg d2h':>8} "
        + " ".join(f"{c:>9}" for c in cols)
        + f" {'cg ratio':>8} {'gc ratio':>8} {'cg +us/hop':>10} {'gc +us/hop':>10}"
    )
    for row in rows:
        copy = row.get("copy", {})

        def c(k, copy=copy):
            v = copy.get(k, {})
            return f"{v['median_us']:>8.1f}" if isinstance(v, dict) and v else f"{'-':>8}"

        vals = [med(row, k) for k in cols]
        line = f"{row['bytes']:>9} {c('pinned_h2d')} {c('pinned_d2h')} "
        line += f"{c('pageable_h2d')} {c('pageable_d2h')} "
        line += " ".join(f"{v:>9.0f}" if v else f"{'-':>9}" for v in vals)
        for bare, het in PAIRS:
            b, h = med(row, bare), med(row, het)
            line += f" {h / b:>8.2f}" if b and h else f" {'-':>8}"
        for bare, het in PAIRS:
            b, h = med(row, bare), med(row, het)
            line += f" {(h - b) / HOPS:>10.1f}" if b and h else f" {'-':>10}"
        print(line)


def environment() -> dict:
    meta = {"machine": f"{platform.node()} {platform.machine()}", "date": time.ctime()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["card"] = (
            torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU (emulated NPU)"
        )
    except ImportError:
        meta["torch"] = meta["card"] = "?"
    try:
        import ray

        meta["ray"] = ray.__version__
    except ImportError:
        meta["ray"] = "?"
    return meta


if __name__ == "__main__":
    main()
