"""A GPT-2 XL-sized model as a two-stage pipeline over two GPUs (issue 9): hetero's throughput
plan run on Ray with NCCL between the GPUs, against one GPU running the whole model.

    python benchmarks/pipeline_2gpu.py --json out.json             # the 2-GPU machine
    python benchmarks/pipeline_2gpu.py --tiny --json /tmp/p2.json   # CPU smoke test (~2 min)

Model: GPT2Model(GPT2Config(n_embd 1600, n_layer 48, n_head 25, vocab 50257, n_positions
1024, use_cache=False)), 1.56B parameters, random weights built directly on the GPU in
float16 (no 6 GB float32 detour). Output: last_hidden_state, which every stage that talks
to the caller copies to host memory (what hetero's executor hands back).

Batch: 192 sequences x 512 tokens, cut into 24 microbatches of 8 x 512 (4,096 tokens).
Why: a microbatch of 4,096 tokens keeps each stage GPU-bound (~20 ms of GPU work per stage
with eager kernels; the eager runner needs ~5-8 ms of host time to launch a 24-layer
partition), and 24 microbatches make the pipeline's fill and drain cost 1/25 of the run:
with two stages the ideal speedup over one GPU for M microbatches is 2M/(M+1) = 1.92 here
(1.78 for 8). Both sides get the same 98,304 tokens. The last stage's outputs cross Ray's
shared-memory channel to the caller (13 MB per microbatch): that is in hetero's number, and
the one-GPU baseline is reported both with its outputs left on the GPU (the number the
speedup uses) and with them copied to the host.

Sections (each in its own child process with a hard timeout: Ray 2.60 and NCCL set-up can
block, and a child that hangs is killed with its Ray processes; what it measured is kept):
  hetero   one GPU, whole model: eager (full batch in one call; microbatches one after
           another; the same with outputs copied to the host), outputs kept as reference.
           The torch peer copy GPU0<->GPU1 (the link's rate) first. Then hetero:
           capture at the microbatch shape, plan with objective="throughput" over
           configs/clusters/h100x2.yaml (two GPUs and their host CPU); if the plan is not
           two GPU stages (it puts the final view on the CPU), plan again with the CPU
           excluded and say so. Also planned: the same cluster with the GPU<->GPU link at the
           measured peer-copy rate, and the planner's predicted stage times at every layer
           boundary. hetero.compile(executor="ray", backends eager), the executor's edge
           transports (stage 0 -> stage 1 must be "nccl") and Ray's NCCL group, then
           `run_many` over the 24 microbatches (up to 4 in flight), outputs against the
           one-GPU model; `run` one microbatch at a time for comparison.
  sweep    every layer boundary k = 1..47, measured: two Ray actors (one GPU each) hold the
           whole model; a compiled graph driver -> A (embeddings + blocks [0, k)) -> NCCL ->
           B (blocks [k, 48) + ln_f, output to host) -> driver takes k with each microbatch,
           so ONE graph measures every boundary without recompiling: steady-state time per
           microbatch (between consecutive completions, 4 in flight) at each k, then the
           planner's k +-2 and the best measured k's again (2 more rounds of 16). The same
           actors time every block on each GPU (CUDA events, forward hooks). Also per hop:
           GPU->GPU NCCL through the compiled graph for 4 KiB ... 256 MiB and the pipeline's
           own payload, against a 4 KiB round trip (achieved GB/s).
  best     (when the planner's split measured >2% below the best k; then before
           `compile`) hetero pinned to the best measured split (pins h.0..h.k-1 -> gpu0,
           the rest -> gpu1), the same measurements as `hetero`'s pipeline.
  compile  one GPU, torch.compile (default mode), microbatches one after another.
The sweep's actors run transformers' modules, hetero's stages run the captured core-ATen
partitions: the sweep ranks boundaries with one harness; hetero's own number is the
`hetero` section's. The sweep also times the best k returning only the last token, which
shows what the 13 MB per microbatch to the caller costs (--output last runs the whole
benchmark that way: a prefill-style model returning last_hidden_state[:, -1]).

--tiny: a 4-layer, 64-wide GPT-2 in float32 on "devices" a and b and a host CPU, all
CPUs of this machine (configs in TINY_CLUSTER): plan (the host is excluded when used),
hetero on Ray, the sweep, the hops over shared memory, and `best` always (the pins path);
no NCCL, no peer copy, no torch.compile.

Every process started here has NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 (set below before torch or Ray load, inherited by the children and
Ray's raylet and workers, and passed again through ray.init's runtime_env); nothing here
creates multicast objects. --budget-s: no section starts past it; each child's timeout
ends by budget + --grace-s. The JSON is rewritten after every step.
"""

from __future__ import annotations

import os

NCCL_ENV = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}
os.environ.update(NCCL_ENV)
os.environ.setdefault("NCCL_DEBUG", "WARN")  # NCCL's own warnings reach the log

import argparse  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from dataclasses import asdict, dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

from bounded import run_bounded  # noqa: E402

from hetero.cluster import connect  # noqa: E402
from hetero.runtime import dag as hetero_dag  # noqa: E402
from hetero.runtime.faults import bounded  # noqa: E402

T0 = float(os.environ.get("PIPE2_T0") or time.time())  # the parent's start, for every log line
REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILE = REPO / "configs" / "clusters" / "h100x2.yaml"
BACKENDS = {"gpu": "eager", "cpu": "eager"}
INFLIGHT = 4  # executions in a graph at once (RayExecutor's default max_inflight)
BLOCK = re.compile(r"(?:^|\.)h\.(\d+)(?=$|[.#])")  # a transformer block's group or module
MIB = 2**20
# name, expected seconds, most seconds (GPU run); the tiny run's are in TINY_TIMES
GPU_TIMES = {"hetero": (150, 240), "sweep": (90, 190), "compile": (100, 170), "best": (110, 190)}
TINY_TIMES = {"hetero": (60, 150), "sweep": (40, 110), "compile": (60, 120), "best": (50, 120)}
TINY_CLUSTER = {
    "name": "tiny-3cpu",
    "hosts": [
        {
            "name": "node0",
            "devices": [
                {"name": n, "kind": "cpu", "cores": 1, "bandwidth": "20 GB/s", "memory": "8 GB"}
                for n in ("host", "a", "b")
            ],
            "links": [
                {"between": [x, y], "bandwidth": "20 GB/s", "kind": "memory"}
                for x, y in (("host", "a"), ("host", "b"), ("a", "b"))
            ],
        }
    ],
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} +{time.time() - T0:6.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class Setup:
    tiny: bool
    layers: int
    width: int
    heads: int
    vocab: int
    positions: int
    batch: int
    seq: int
    microbatches: int
    reps: int
    output: str = "hidden"  # hidden: last_hidden_state; last: its last token only

    @property
    def prefix(self) -> str:
        """Module path of the GPT2Model inside what is captured."""
        return "model." if self.output == "last" else ""

    @property
    def gpu(self) -> bool:
        return not self.tiny

    @property
    def mb(self) -> int:
        return self.batch // self.microbatches

    @property
    def mb_tokens(self) -> int:
        return self.mb * self.seq

    @property
    def tokens(self) -> int:
        return self.mb_tokens * self.microbatches

    @property
    def devices(self) -> tuple[str, str]:
        """The two pipeline devices' names in the cluster."""
        return ("node0/gpu0", "node0/gpu1") if self.gpu else ("node0/a", "node0/b")


def make_setup(args) -> Setup:
    tiny = dict(layers=4, width=64, heads=4, vocab=512, positions=64, batch=16, seq=32, mbs=8)
    xl = dict(layers=48, width=1600, heads=25, vocab=50257, positions=1024, batch=192, seq=512)
    base = tiny if args.tiny else {**xl, "mbs": 24}

    def pick(name, key):
        v = getattr(args, name)
        return base[key] if v is None else v

    s = Setup(
        tiny=args.tiny,
        layers=pick("layers", "layers"),
        width=pick("width", "width"),
        heads=pick("heads", "heads"),
        vocab=base["vocab"],
        positions=base["positions"],
        batch=pick("batch", "batch"),
        seq=pick("seq", "seq"),
        microbatches=pick("microbatches", "mbs"),
        reps=args.reps or (3 if args.tiny else 5),
        output=args.output,
    )
    if s.batch % s.microbatches:
        raise SystemExit(f"--batch {s.batch} is not a multiple of --microbatches {s.microbatches}")
    return s


# ---- model, inputs, timing ---------------------------------------------------------------


def build_model(s: Setup, device):
    """GPT2Model with random weights, built on `device` in its final dtype."""
    import torch
    from transformers import GPT2Config, GPT2Model

    cfg = GPT2Config(
        n_layer=s.layers, n_embd=s.width, n_head=s.heads, vocab_size=s.vocab,
        n_positions=s.positions, use_cache=False, bos_token_id=s.vocab - 1,
        eos_token_id=s.vocab - 1,
    )  # fmt: skip
    dtype = torch.float16 if s.gpu else torch.float32
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = GPT2Model(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def as_captured(model, s: Setup):
    """What the benchmark runs: the GPT2Model, or it returning only the last token's state
    (--output last: a prefill-style result, 13 MB -> 25 KB per microbatch to the caller)."""
    import torch

    if s.output != "last":
        return model

    class LastToken(torch.nn.Module):
        def __init__(self, inner) -> None:
            super().__init__()
            self.model = inner

        def forward(self, input_ids):
            return hidden(self.model(input_ids=input_ids))[:, -1]

    return LastToken(model).eval()


def microbatch_ids(s: Setup) -> list:
    """The caller's inputs: host tensors (stage 0 moves them to its device)."""
    import torch

    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, s.vocab, (s.mb, s.seq), generator=g) for _ in range(s.microbatches)]


def hidden(out):
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    return out[0] if isinstance(out, tuple | list) else out


def compare(outs, refs) -> dict:
    errs, diffs = [], []
    for o, r in zip(outs, refs, strict=True):
        a, b = hidden(o).float().cpu(), r.float()
        errs.append(float((a - b).norm() / b.norm()))
        diffs.append(float((a - b).abs().max()))
    return {"max_rel_err": max(errs), "max_abs_diff": max(diffs), "compared": len(errs)}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            torch.cuda.synchronize(d)


def wall(fn, reps: int, warmup: int = 1) -> list[float]:
    """Seconds per call, synchronised (one call at a time)."""
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t)
    return out


def rate(tokens: int, seconds: list[float]) -> dict:
    med = statistics.median(seconds)
    return {"tokens_per_s": tokens / med, "median_s": med, "runs_s": [round(x, 4) for x in seconds]}


def init_ray(s: Setup, num_gpus: int) -> None:
    """hetero's private Ray head (cluster/connect.py) with the NCCL environment in every
    worker's runtime_env; the object store sized to fit /dev/shm (Ray falls back to slow
    disk when it does not)."""
    import ray

    free = shutil.disk_usage("/dev/shm").free if os.path.isdir("/dev/shm") else 0
    want = 8e9 if s.gpu else 3e8
    store = int(min(want, 0.5 * free)) if free > 4e8 else None
    connect.init_ray(
        None,
        num_cpus=8 if s.gpu else 3,
        num_gpus=num_gpus,
        log_to_driver=True,
        object_store_memory=store,
        runtime_env={"env_vars": {**NCCL_ENV, "NCCL_DEBUG": os.environ["NCCL_DEBUG"]}},
    )
    log(f"ray {ray.__version__} up: {ray.cluster_resources()}; /dev/shm free {free / 1e9:.1f} GB")


# ---- child: peer copy, one GPU, hetero's pipeline ---------------------------------------------


def peer_copy(sizes: list[int], reps: int = 10) -> dict:
    """torch copies between the two GPUs (cudaMemcpyPeer; NVLink or PCIe as the box has)."""
    import torch

    n = torch.cuda.device_count()
    out: dict = {"device_count": n, "names": [torch.cuda.get_device_name(i) for i in range(n)]}
    if n < 2:
        return out
    out["can_access_peer"] = {
        "0->1": torch.cuda.can_device_access_peer(0, 1),
        "1->0": torch.cuda.can_device_access_peer(1, 0),
    }
    rows = []
    for nbytes in sizes:
        a = torch.empty(nbytes, dtype=torch.uint8, device="cuda:0")
        b = torch.empty(nbytes, dtype=torch.uint8, device="cuda:1")
        row = {"bytes": nbytes}
        for name, src, dst in (("0->1", a, b), ("1->0", b, a)):
            t = statistics.median(wall(lambda s=src, d=dst: d.copy_(s), reps, warmup=3))
            row[name] = {"us": t * 1e6, "GBps": nbytes / t / 1e9}
        rows.append(row)
        del a, b
    out["rows"] = rows
    big = max(rows, key=lambda r: r["bytes"])
    out["GBps"] = min(big["0->1"]["GBps"], big["1->0"]["GBps"])
    torch.cuda.empty_cache()
    return out


def one_device(model, micro_dev, s: Setup) -> tuple[dict, list]:
    """The whole model on one device: the full batch in one call, the microbatches one after
    another, and the same with every output copied to the host (as a pipeline returns it)."""
    import torch

    row: dict = {}
    refs: list = []
    with torch.inference_mode():
        whole = torch.cat(micro_dev)
        reps = max(2, s.reps - 2)
        row["full_batch"] = rate(s.tokens, wall(lambda x=whole: model(x), reps))
        whole = None  # the activations of the full batch can go before the next loop
        row["microbatch_loop"] = rate(s.tokens, wall(lambda: [model(x) for x in micro_dev], reps))
        row["microbatch_loop_to_host"] = rate(
            s.tokens,
            wall(lambda: [hidden(model(x)).cpu() for x in micro_dev], reps),
        )
        refs = [hidden(model(x)).cpu() for x in micro_dev]
    best = max(row["full_batch"]["tokens_per_s"], row["microbatch_loop"]["tokens_per_s"])
    row["best_tokens_per_s"] = best
    return row, refs


def cluster_for(s: Setup):
    from hetero.cluster.spec import ClusterSpec

    if s.gpu:
        return ClusterSpec.from_yaml(CLUSTER_FILE)
    return ClusterSpec.from_dict(TINY_CLUSTER)


def with_link(cluster, gbps: float):
    """The cluster with its GPU<->GPU links at `gbps` GB/s (the measured peer copy rate)."""
    from dataclasses import replace

    from hetero.cluster.spec import ClusterSpec

    kinds = {d.name: d.kind for d in cluster.devices}
    links = tuple(
        replace(link, bandwidth=gbps * 1e9)
        if kinds.get(link.a) == kinds.get(link.b) == "gpu"
        else link
        for link in cluster.links
    )
    return ClusterSpec(f"{cluster.name}-measured-link", cluster.devices, links)


def split_of(plan, s: Setup) -> dict:
    """Where the plan cuts the model: blocks on the first stage (k), devices, predicted."""
    parts = sorted(plan.partitions, key=lambda p: p.index)
    blocks = []
    for p in parts:
        got = set()
        for g in p.groups:
            m = BLOCK.search(g)
            if m:
                got.add(int(m.group(1)))
        blocks.append(sorted(got))
    k, inside = None, None
    if len(parts) == 2 and blocks[0] == list(range(len(blocks[0]))):
        shared = sorted(set(blocks[0]) & set(blocks[1]))
        if shared:  # the cut is inside this block: k is the blocks wholly on stage 0
            inside = shared[0]
        else:
            k = len(blocks[0])
    return {
        "k": k,
        "cut_inside_block": inside,
        "stages": len(parts),
        "devices": [p.device for p in parts],
        "blocks_per_stage": [len(b) for b in blocks],
        "predicted_ms_per_microbatch": plan.predicted_ms,
        "stage_predicted_ms": [round(p.predicted_ms, 3) for p in parts],
    }


def two_stage_plan(graph, cluster, s: Setup, pins=None):
    """The throughput plan over every device; again without the host CPU if it is not two
    stages on the two pipeline devices. Returns (plan, excluded device names, note)."""
    from hetero.interfaces.api import plan as make_plan

    first = make_plan(graph, cluster, "throughput", backends=BACKENDS, pins=pins)
    used = [p.device for p in sorted(first.partitions, key=lambda p: p.index)]
    if len(used) == 2 and set(used) == set(s.devices):
        return first, (), "", first
    others = tuple(d.name for d in cluster.devices if d.name not in s.devices)
    note = (
        f"the throughput plan over every device was {len(used)} stage(s) on {used}; "
        f"planned again with {list(others)} excluded (hetero.compile(exclude=...))"
    )
    plan = make_plan(graph, cluster, "throughput", backends=BACKENDS, pins=pins, exclude=others)
    return plan, others, note, first


def predicted_curve(graph, cluster, s: Setup, exclude) -> dict:
    """The planner's cost model at every layer boundary: stage times (compute + the values
    a stage receives + caller I/O, as the DP sees them) with blocks [0, k) on the first
    device and the rest on the second."""
    import numpy as np

    from hetero.backends.registry import default_registry
    from hetero.partitioner.algorithms.adapter import (
        build_problem,
        refine_for_support,
        resolve_backends,
    )
    from hetero.partitioner.algorithms.problem import RESIDENT
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.decisions import BackendAssignment

    registry = default_registry()
    backends, _ = resolve_backends(cluster, BackendAssignment.parse(BACKENDS), registry)
    groups = refine_for_support(
        graph.coarsen(), cluster, backends=backends, registry=registry, exclude=exclude
    )
    problem, _ = build_problem(
        groups,
        cluster,
        CostModel.load(cluster=cluster),
        backends=backends,
        registry=registry,
        exclude=exclude,
    )

    def placement(name: str) -> int:
        d = problem.devices.index(cluster.device(name).name)
        return next(
            i for i, p in enumerate(problem.placements) if p.device == d and p.weights == RESIDENT
        )

    p0, p1 = (placement(d) for d in s.devices)
    starts = {}
    for i, name in enumerate(problem.names):
        m = BLOCK.search(name)
        if m and int(m.group(1)) not in starts:
            starts[int(m.group(1))] = i
    curve = {}
    for k in range(1, s.layers):
        if k not in starts:
            continue
        cut = starts[k]
        assign = np.array([p0] * cut + [p1] * (problem.n - cut))
        times = problem.stage_times(assign)
        curve[k] = {"stage_ms": [round(t * 1e3, 3) for t in times], "max_ms": max(times) * 1e3}
    best = min(curve, key=lambda k: curve[k]["max_ms"]) if curve else None
    return {"per_k": curve, "best_k": best}


def pins_for(k: int, s: Setup) -> dict[str, str]:
    a, b = s.devices
    return {f"{s.prefix}h.{i}": (a if i < k else b) for i in range(s.layers)}


def nccl_groups() -> int:
    with contextlib.suppress(Exception):
        from ray.experimental.channel import ChannelContext

        return len(ChannelContext.get_current().communicator_handles)
    return -1


def child_hetero(s: Setup, a, emit) -> None:
    import torch

    import hetero
    from hetero.interfaces.api import plan as make_plan

    skip = set(a.skip)
    pinned = a.pin_k is not None
    dev = torch.device("cuda", 0) if s.gpu else torch.device("cpu")
    if not s.gpu:
        torch.set_num_threads(1)
    peer: dict = {}
    if s.gpu and not pinned and "peer" not in skip:
        log("torch peer copies GPU0 <-> GPU1")
        peer = peer_copy([4096, MIB, 16 * MIB, 64 * MIB, 256 * MIB])
        emit("peer", peer)
        log(f"peer copy: {peer.get('GBps', 0):.1f} GB/s at 256 MiB; {peer.get('can_access_peer')}")
    log(f"building GPT-2 ({s.layers} layers, width {s.width}) on {dev}, output {s.output}")
    model = as_captured(build_model(s, dev), s)
    params = sum(p.numel() for p in model.parameters())
    emit(
        "model",
        {"params": params, "device": str(dev), "dtype": str(next(model.parameters()).dtype)},
    )
    micro = microbatch_ids(s)
    micro_dev = [x.to(dev) for x in micro]
    if not pinned and "baseline" not in skip:
        log(f"one device, whole model, eager: {s.batch} x {s.seq} tokens")
        single, refs = one_device(model, micro_dev, s)
        emit("single", single)
        if s.gpu:
            torch.cuda.empty_cache()  # the full batch's activations: give GPU 0 back to stage 0
        log(
            "one device: "
            + ", ".join(
                f"{k} {v['tokens_per_s']:.0f} tok/s"
                for k, v in single.items()
                if isinstance(v, dict)
            )
        )
    else:
        with torch.inference_mode():
            refs = [hidden(model(x)).cpu() for x in micro_dev]

    log("capture (torch.export) at the microbatch shape")
    t = time.perf_counter()
    graph = hetero.capture(model, (micro_dev[0],))
    emit("capture_s", time.perf_counter() - t)
    cluster = cluster_for(s)
    pins = pins_for(a.pin_k, s) if pinned else None
    t = time.perf_counter()
    plan, excluded, note, first = two_stage_plan(graph, cluster, s, pins)
    split = split_of(plan, s)
    emit(
        "plan",
        {
            "cluster": cluster.name,
            "pins": f"h.0..h.{a.pin_k - 1} -> {s.devices[0]}, rest -> {s.devices[1]}"
            if pinned
            else None,
            "excluded": list(excluded),
            "note": note,
            "first_plan": split_of(first, s),
            "plan_s": time.perf_counter() - t,
            **split,
        },
    )
    log(f"plan: {split}; {note or 'two GPU stages at once'}")
    print(plan.explain(), flush=True)
    if not pinned and "measured-link" not in skip:
        gbps = peer.get("GBps")
        if gbps:
            alt = make_plan(
                graph, with_link(cluster, gbps), "throughput", backends=BACKENDS, exclude=excluded
            )
            emit("plan_measured_link", {"GBps": gbps, **split_of(alt, s)})
            log(f"plan with the GPU<->GPU link at the measured {gbps:.1f} GB/s: {split_of(alt, s)}")
        with contextlib.suppress(Exception):  # a read-out of the cost model; never fatal
            emit("predicted_curve", predicted_curve(graph, cluster, s, excluded))
    if split["stages"] != 2:
        raise RuntimeError(f"the plan is not two stages: {split}")

    init_ray(s, 2 if s.gpu else 0)
    cache = Path(tempfile.mkdtemp(prefix="pipe2-", dir=a.cache_root))
    log(f"hetero.compile(executor='ray', backends={BACKENDS}), artifacts in {cache}")
    t = time.perf_counter()
    cm = hetero.compile(
        model, (micro_dev[0],), cluster=cluster, objective="throughput", backends=BACKENDS,
        cache_dir=cache, executor="ray", pins=pins, exclude=excluded, graph=graph, plan=plan,
    )  # fmt: skip
    emit("compile_s", time.perf_counter() - t)
    ex = cm.executor
    wiring = {
        "transports": {f"p{i}": v for i, v in ex.transports.items()},
        "nccl_groups_in_driver": nccl_groups(),
        "workers": {d: {"pid": i["pid"], "stages": i["stages"]} for d, i in ex.worker_info.items()},
        "stages": [
            {"index": st.index, "device": st.device.name, "inputs": list(st.inputs)[:4]}
            for st in cm.stages
        ],
    }
    emit("wiring", wiring)
    log(f"compiled in {time.perf_counter() - t:.1f} s; edges: {wiring['transports']}")
    if s.gpu and "nccl" not in wiring["transports"].values():
        log("WARNING: no stage sends over NCCL")

    batch = [(x,) for x in micro]
    with torch.inference_mode():
        t = time.perf_counter()
        cm.run_many(batch[: min(4, len(batch))])  # first executions: NCCL connects, allocators warm
        emit("first_run_s", time.perf_counter() - t)
        outs = []

        def pipelined(items=batch):
            outs[:] = cm.run_many(items)

        runs = wall(pipelined, s.reps, warmup=0)
        check = compare(outs, refs)
        short = batch[: max(2, len(batch) // 3)]
        runs_short = wall(lambda: cm.run_many(short), s.reps, warmup=0)
        steady = (statistics.median(runs) - statistics.median(runs_short)) / (
            len(batch) - len(short)
        )
        one_at_a_time = wall(lambda: [cm(*x) for x in batch], 1, warmup=0)
    row = {
        **rate(s.tokens, runs),
        "microbatches": len(batch),
        "inflight": ex.inflight,
        "steady_ms_per_microbatch": steady * 1e3,
        "steady_tokens_per_s": s.mb_tokens / steady if steady > 0 else None,
        "short_batch": {"microbatches": len(short), **rate(len(short) * s.mb_tokens, runs_short)},
        "one_at_a_time": rate(s.tokens, one_at_a_time),
        "vs_one_device": check,
    }
    emit("pipeline", row)
    log(
        f"hetero pipeline: {row['tokens_per_s']:.0f} tok/s ({row['median_s'] * 1e3:.1f} ms for "
        f"{len(batch)} microbatches), steady {steady * 1e3:.2f} ms/microbatch; one at a time "
        f"{row['one_at_a_time']['tokens_per_s']:.0f} tok/s; vs one device {check}"
    )
    text = cm.plan.explain()
    emit("explain", text)
    print(text, flush=True)
    with contextlib.suppress(Exception):
        table = ex.metrics.table()
        emit("metrics", table)
        print(table, flush=True)
    if not bounded(cm.shutdown, 5, "executor shutdown"):  # the parent ends what is left
        log("executor shutdown did not finish in 5 s; the child exits anyway")
    shutil.rmtree(cache, ignore_errors=True)


# ---- child: the boundary sweep and the hops (bare compiled graph) -------------------------------


class HalfModel:
    """One device's copy of the whole model (a Ray actor in the sweep): `first` runs the
    embeddings and blocks [0, k), `second` blocks [k, L) and ln_f, with k in each message."""

    def __init__(self, setup: dict) -> None:
        import torch

        self.s = Setup(**setup)
        self.cuda = self.s.gpu and torch.cuda.is_available()
        self.dev = torch.device("cuda", 0) if self.cuda else torch.device("cpu")
        if not self.cuda:
            torch.set_num_threads(1)
        self.model = build_model(self.s, self.dev)
        self.blocks = list(self.model.h)
        dtype = next(self.model.parameters()).dtype
        # stage 2 takes hidden states as inputs_embeds; a zero position table keeps them as is
        self.zero_wpe = torch.nn.Embedding(self.s.positions, self.s.width, device=self.dev)
        self.zero_wpe = self.zero_wpe.to(dtype).requires_grad_(False)
        torch.nn.init.zeros_(self.zero_wpe.weight)
        self.views: dict = {}
        self.buf = None

    def info(self) -> dict:
        import torch

        return {
            "pid": os.getpid(),
            "device": torch.cuda.get_device_name(0) if self.cuda else "cpu",
            "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
        }

    def _view(self, k: int, first: bool):
        """The model with only some blocks (modules shared with the full model)."""
        import copy

        import torch

        key = (k, first)
        if key not in self.views:
            view = copy.copy(self.model)
            view._modules = dict(self.model._modules)
            if first:
                view._modules["h"] = torch.nn.ModuleList(self.blocks[:k])
                view._modules["ln_f"] = torch.nn.Identity()
            else:
                view._modules["h"] = torch.nn.ModuleList(self.blocks[k:])
                view._modules["wpe"] = self.zero_wpe
            self.views[key] = view
        return self.views[key]

    def first(self, msg):
        import torch

        kind, x, k, out = msg
        if kind == "hop":  # x bytes of a resident buffer, sent as they are
            if self.buf is None or self.buf.numel() < x:
                self.buf = torch.ones(max(x, 1), dtype=torch.uint8, device=self.dev)
            return ("hop", self.buf[:x], None, out)
        with torch.inference_mode():
            h = hidden(self._view(k, True)(input_ids=x.to(self.dev)))
        return ("layers", h.contiguous(), k, out)

    def second(self, msg):
        import torch

        kind, x, k, out = msg
        if kind == "hop":
            return ("hop", int(x.numel()), str(x.device))
        with torch.inference_mode():
            h = hidden(self._view(k, False)(inputs_embeds=x))
            if out == "last":
                h = h[:, -1].contiguous()
        return ("layers", h.cpu(), k)  # to the caller's host memory, as hetero's last stage

    def profile(self, reps: int = 5) -> dict:
        """ms of the embeddings, every block and the tail (ln_f) at the microbatch shape,
        from CUDA events recorded by forward hooks (wall time on a CPU)."""
        import torch

        s = self.s
        ids = torch.randint(0, s.vocab, (s.mb, s.seq), device=self.dev)
        stamps: dict = {}

        def mark():
            if not self.cuda:
                return time.perf_counter()
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            return e

        def ms(x, y) -> float:
            return x.elapsed_time(y) if self.cuda else (y - x) * 1e3

        hooks = []
        for i, blk in enumerate(self.blocks):
            hooks.append(
                blk.register_forward_pre_hook(lambda m, a, i=i: stamps.update({("s", i): mark()}))
            )
            hooks.append(
                blk.register_forward_hook(lambda m, a, o, i=i: stamps.update({("e", i): mark()}))
            )
        rows = []
        try:
            with torch.inference_mode():
                for r in range(reps + 1):
                    stamps.clear()
                    start = mark()
                    self.model(input_ids=ids)
                    end = mark()
                    if self.cuda:
                        torch.cuda.synchronize()
                    if r == 0:
                        continue
                    last = len(self.blocks) - 1
                    rows.append(
                        {
                            "embed": ms(start, stamps[("s", 0)]),
                            "blocks": [
                                ms(stamps[("s", i)], stamps[("e", i)]) for i in range(last + 1)
                            ],
                            "tail": ms(stamps[("e", last)], end),
                            "total": ms(start, end),
                        }
                    )
        finally:
            for h in hooks:
                h.remove()
        med = statistics.median
        return {
            "embed_ms": med(r["embed"] for r in rows),
            "block_ms": [med(r["blocks"][i] for r in rows) for i in range(len(self.blocks))],
            "tail_ms": med(r["tail"] for r in rows),
            "total_ms": med(r["total"] for r in rows),
        }


def completions(graph, msgs, timeout: float) -> tuple[float, list[float]]:
    """Submit `msgs` with up to INFLIGHT in the graph (hetero's runtime keeps the window);
    the time of each completion."""
    import ray

    done: list[float] = []
    t0 = time.perf_counter()
    for _, ref in hetero_dag.pipelined(graph.execute, msgs, INFLIGHT):
        ray.get(ref, timeout=timeout)
        done.append(time.perf_counter())
    return t0, done


def steady_period(done: list[float], skip: int = 2) -> float:
    """Seconds between consecutive completions after the first `skip` (fill)."""
    skip = min(skip, len(done) - 2)
    return (done[-1] - done[skip]) / (len(done) - 1 - skip)


def child_sweep(s: Setup, a, emit) -> None:
    import ray
    from ray.dag import InputNode

    skip = set(a.skip)
    init_ray(s, 2 if s.gpu else 0)
    opts = {"num_gpus": 1, "num_cpus": 0} if s.gpu else {"num_cpus": 1}
    actor = ray.remote(HalfModel)
    first, second = (actor.options(**opts).remote(asdict(s)) for _ in range(2))
    log("sweep actors: building the model on each device")
    info = ray.get([first.info.remote(), second.info.remote()], timeout=300)
    emit("workers", info)
    log(f"actors: {info}")
    prof = ray.get([first.profile.remote(), second.profile.remote()], timeout=300)
    emit("layer_ms", {"first": prof[0], "second": prof[1]})
    log(
        f"per-block ms (median over blocks): device A {statistics.median(prof[0]['block_ms']):.3f}, "
        f"device B {statistics.median(prof[1]['block_ms']):.3f}; whole model "
        f"{prof[0]['total_ms']:.2f} / {prof[1]['total_ms']:.2f} ms per microbatch"
    )
    # A -> B over NCCL between GPUs (Ray's shared memory on the CPU), compiled the way
    # hetero's runtime compiles its plans (runtime/dag.py)
    with InputNode() as inp:
        transport = hetero_dag.NCCL if s.gpu else hetero_dag.SHM
        dag = second.second.bind(hetero_dag.send(first.first.bind(inp), transport))
    t = time.perf_counter()
    graph = hetero_dag.compile_dag(dag, max_inflight=INFLIGHT, submit_timeout_s=120)
    emit("graph_compile_s", time.perf_counter() - t)
    emit("nccl_groups_in_driver", nccl_groups())
    log(f"compiled graph A -> {'NCCL' if s.gpu else 'shm'} -> B in {time.perf_counter() - t:.1f} s")
    micro = microbatch_ids(s)
    timeout = 120.0
    t = time.perf_counter()
    ray.get(graph.execute(("layers", micro[0], s.layers // 2, s.output)), timeout=timeout)
    emit("first_execute_s", time.perf_counter() - t)

    if "hop" not in skip:
        payload = s.mb_tokens * s.width * (2 if s.gpu else 4) + s.mb * s.seq * s.seq
        sizes = [4096, 256 * 1024, MIB, 4 * MIB, 16 * MIB, 64 * MIB, 256 * MIB]
        if not s.gpu:
            sizes = [4096, 64 * 1024, MIB]
        sizes = sorted(set(sizes) | {payload})
        rows = []
        for n in sizes:
            msg = ("hop", n, None, None)
            for _ in range(3):
                ray.get(graph.execute(msg), timeout=timeout)
            trips = []
            for _ in range(15 if n <= 64 * MIB else 8):
                t = time.perf_counter()
                ray.get(graph.execute(msg), timeout=timeout)
                trips.append(time.perf_counter() - t)
            rows.append({"bytes": n, "round_trip_us": statistics.median(trips) * 1e6})
        base = rows[0]["round_trip_us"]
        for r in rows:
            extra = r["round_trip_us"] - base
            r["extra_us"] = extra
            r["GBps"] = r["bytes"] / (extra * 1e3) if extra > 0 and r["bytes"] >= MIB else None
            r["pipeline_payload"] = r["bytes"] == payload
        emit("hops", {"transport": "nccl" if s.gpu else "shm", "rows": rows})
        for r in rows:
            gb = f"{r['GBps']:.1f} GB/s" if r["GBps"] else "-"
            log(
                f"hop {r['bytes']:>10} B: {r['round_trip_us']:9.0f} us round trip, +{r['extra_us']:8.0f} us, {gb}"
            )

    if "sweep" in skip:
        return
    per_k: dict[int, list[float]] = {}

    def measure(k: int, n: int, out: str = s.output, keep: bool = True) -> float:
        msgs = [("layers", micro[i % len(micro)], k, out) for i in range(n)]
        _, done = completions(graph, msgs, timeout)
        period = steady_period(done)
        if keep:
            per_k.setdefault(k, []).append(period)
        return period

    def table() -> dict:
        return {
            str(k): {
                "period_ms": [round(p * 1e3, 3) for p in v],
                "tokens_per_s": s.mb_tokens / statistics.median(v),
            }
            for k, v in sorted(per_k.items())
        }

    ks = list(range(1, s.layers))
    for k in ks:
        measure(k, a.sweep_mb)
        if k % 8 == 0 or k == ks[-1]:
            emit("sweep", table())
            log(f"sweep: k={k}: {per_k[k][-1] * 1e3:.2f} ms per microbatch")
    first_pass = {k: v[0] for k, v in per_k.items()}
    top = sorted(first_pass, key=first_pass.get)[: a.refine_top]
    near = [] if a.planner_k is None else [a.planner_k + d for d in range(-2, 3)]
    candidates = sorted({k for k in top + near if 1 <= k < s.layers})
    log(f"refining k in {candidates} ({a.refine_rounds} rounds of {a.refine_mb})")
    for r in range(a.refine_rounds):
        for k in candidates if r % 2 == 0 else reversed(candidates):
            measure(k, a.refine_mb)
    emit("sweep", table())
    emit("refined", candidates)
    # what returning the full hidden state to the caller costs, at the best boundary
    best = min(per_k, key=lambda k: statistics.median(per_k[k]))
    cost = {}
    for out in ("hidden", "last", "hidden", "last"):
        cost.setdefault(out, []).append(measure(best, a.refine_mb, out, keep=False) * 1e3)
    emit("output_cost", {"k": best, **{o: {"period_ms": v} for o, v in cost.items()}})
    log(
        f"at k={best}: ms per microbatch returning hidden states {cost['hidden']}, last token {cost['last']}"
    )


# ---- child: torch.compile on one GPU -----------------------------------------------------------


def child_compile(s: Setup, a, emit) -> None:
    import torch

    dev = torch.device("cuda", 0) if s.gpu else torch.device("cpu")
    model = as_captured(build_model(s, dev), s)
    micro_dev = [x.to(dev) for x in microbatch_ids(s)]
    with torch.no_grad():
        ref = hidden(model(micro_dev[0])).float()
        fn = torch.compile(model)
        t = time.perf_counter()
        got = hidden(fn(micro_dev[0])).float()
        sync()
        emit("compile_s", time.perf_counter() - t)
        err = float((got - ref).norm() / ref.norm())
        runs = wall(lambda: [fn(x) for x in micro_dev], s.reps)
    emit("compile", {**rate(s.tokens, runs), "rel_err_vs_eager": err, "mode": "default"})
    log(f"torch.compile one device: {s.tokens / statistics.median(runs):.0f} tok/s (err {err:.1e})")


CHILDREN = {"hetero": child_hetero, "sweep": child_sweep, "compile": child_compile}


def child_main(a) -> None:
    out = Path(a.child_json)
    results: dict = {}

    def emit(key: str, value) -> None:
        results[key] = value
        tmp = out.with_suffix(".tmp")
        tmp.write_text(json.dumps(results, indent=1, default=str))
        tmp.replace(out)

    s = Setup(**json.loads(a.setup))
    name = "hetero" if a.child == "best" else a.child
    try:
        CHILDREN[name](s, a, emit)
    except Exception as e:
        traceback.print_exc()
        emit("error", f"{type(e).__name__}: {str(e)[:2000]}")
    sys.stdout.flush()
    sys.stderr.flush()
    # No ray.shutdown: a live compiled graph's teardown can block for 30 s and more. The
    # parent kills this child's process group, and Ray's processes die with their parent.
    os._exit(0)


# ---- parent ----------------------------------------------------------------------------------


def run_child(name: str, s: Setup, args, timeout: float, extra: list[str]) -> dict:
    cmd = [
        sys.executable, os.path.abspath(__file__), "--child", name, "--setup",
        json.dumps(asdict(s)), "--skip", ",".join(args.skip),
        "--cache-root", args.cache_root, "--sweep-mb", str(args.sweep_mb),
        "--refine-mb", str(args.refine_mb), "--refine-rounds", str(args.refine_rounds),
        "--refine-top", str(args.refine_top), *extra,
    ]  # fmt: skip
    env = {**os.environ, **NCCL_ENV, "PIPE2_T0": str(T0)}
    log(f"== {name}: child started (timeout {timeout:.0f} s)")
    t0 = time.perf_counter()
    got, why, left = run_bounded(cmd, timeout, env)
    if left:
        log(f"{left} process(es) of the {name} child still alive after SIGKILL")
    got["wall_s"] = round(time.perf_counter() - t0, 1)
    if why:
        got["killed" if "killed" in why else "exit"] = why
    log(f"== {name}: done in {got['wall_s']} s {why}")
    return got


def probe(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=15).stdout.strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"({' '.join(cmd)}: {e})"


def nccl_lib_dir() -> str | None:
    """The lib folder of pip's NCCL (torch's dependency), for CuPy, which Ray's NCCL
    communicator uses and which links libnccl.so.2 without shipping it."""
    import importlib.util

    with contextlib.suppress(ImportError, ValueError, AttributeError):
        spec = importlib.util.find_spec("nvidia.nccl")
        for root in (spec.submodule_search_locations or []) if spec else []:
            lib = Path(root) / "lib"
            if any(lib.glob("libnccl.so*")):
                return str(lib)
    return None


def environment(s: Setup) -> dict:
    meta: dict = {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs",
        "python": platform.python_version(),
        "nccl_env": NCCL_ENV,
        "setup": asdict(s),
    }
    code = """import importlib, json
v = {}
for m in ("torch", "ray", "transformers", "triton", "cupy"):
    try:
        v[m] = importlib.import_module(m).__version__
    except Exception as e:
        v[m] = f"({type(e).__name__})"
try:  # what Ray's NCCL communicator loads
    from cupy.cuda import nccl
    v["nccl_cupy"] = nccl.get_version()
except Exception as e:
    v["nccl_cupy"] = f"({type(e).__name__}: {e})"
try:
    import torch
    v["nccl_torch"] = ".".join(map(str, torch.cuda.nccl.version()))
except Exception as e:
    v["nccl_torch"] = f"({type(e).__name__})"
print(json.dumps(v))"""
    with contextlib.suppress(ValueError):
        meta.update(json.loads(probe([sys.executable, "-c", code]) or "{}"))
    if s.gpu:
        meta["nvidia_smi"] = probe(["nvidia-smi", "-L"])
        meta["gpus"] = probe(
            [
                "nvidia-smi",
                "--query-gpu=index,name,compute_mode,memory.total,pcie.link.gen.current",
                "--format=csv,noheader",
            ]
        )
        meta["topology"] = probe(["nvidia-smi", "topo", "-m"])
        meta["nvlink"] = probe(["nvidia-smi", "nvlink", "-s"])[:2000]
    with contextlib.suppress(OSError):
        meta["dev_shm_free_GB"] = round(shutil.disk_usage("/dev/shm").free / 1e9, 1)
    return meta


def summarize(res: dict, s: Setup) -> dict:
    sec = res["sections"]
    het, sw = sec.get("hetero", {}), sec.get("sweep", {})
    out: dict = {"tokens_per_run": s.tokens, "microbatch": [s.mb, s.seq]}
    single = het.get("single", {})
    pipe = het.get("pipeline", {})
    if single:
        out["one_device_best_tok_s"] = single["best_tokens_per_s"]
        out["one_device_to_host_tok_s"] = single["microbatch_loop_to_host"]["tokens_per_s"]
    comp = sec.get("compile", {}).get("compile")
    if comp:
        out["one_device_compile_tok_s"] = comp["tokens_per_s"]
    if pipe:
        out["hetero_tok_s"] = pipe["tokens_per_s"]
        out["hetero_steady_tok_s"] = pipe.get("steady_tokens_per_s")
        out["hetero_vs_one_device_rel_err"] = pipe["vs_one_device"]["max_rel_err"]
    if single and pipe:
        out["speedup"] = pipe["tokens_per_s"] / single["best_tokens_per_s"]
        out["speedup_vs_to_host"] = pipe["tokens_per_s"] / out["one_device_to_host_tok_s"]
        out["goal_1.7x"] = out["speedup"] >= 1.7
    plan = het.get("plan", {})
    k = plan.get("k")
    out["planner_k"] = k
    # a cut inside block j lies between boundaries j and j+1: judged by the worse of them
    near = [k] if k is not None else []
    if k is None and plan.get("cut_inside_block") is not None:
        near = [plan["cut_inside_block"], plan["cut_inside_block"] + 1]
        out["planner_cut_inside_block"] = plan["cut_inside_block"]
    table = sw.get("sweep", {})
    if table:
        best_k = max(table, key=lambda x: table[x]["tokens_per_s"])
        best = table[best_k]["tokens_per_s"]
        out["sweep_best_k"] = int(best_k)
        out["sweep_best_tok_s"] = best
        mine = [table[str(j)]["tokens_per_s"] for j in near if str(j) in table]
        if mine:
            out["sweep_planner_k_tok_s"] = min(mine)
            out["planner_within"] = (best - min(mine)) / best
            out["goal_5pct"] = out["planner_within"] <= 0.05
    curve = het.get("predicted_curve", {})
    if curve:
        out["predicted_best_k"] = curve.get("best_k")
    return out


def print_report(res: dict, s: Setup) -> None:
    sm, sec = res["summary"], res["sections"]
    het, sw = sec.get("hetero", {}), sec.get("sweep", {})
    params = het.get("model", {}).get("params", 0)

    def f(x, fmt="{:,.0f}"):
        return fmt.format(x) if isinstance(x, int | float) else "-"

    print(
        f"\n== GPT-2 ({s.layers} layers, width {s.width}; {params / 1e9:.2f}B params), "
        f"{'float16' if s.gpu else 'float32'}, {s.batch} x {s.seq} tokens = {s.microbatches} "
        f"microbatches of {s.mb} x {s.seq}; {res['meta'].get('nvidia_smi', 'CPU')[:120]}"
    )
    single = het.get("single", {})
    rows = [
        ("one GPU eager, full batch", single.get("full_batch", {}).get("tokens_per_s")),
        ("one GPU eager, microbatch loop", single.get("microbatch_loop", {}).get("tokens_per_s")),
        (
            "one GPU eager, loop, outputs to host",
            single.get("microbatch_loop_to_host", {}).get("tokens_per_s"),
        ),
        ("one GPU torch.compile, loop", sm.get("one_device_compile_tok_s")),
        ("hetero 2 stages, run_many", sm.get("hetero_tok_s")),
        ("hetero 2 stages, steady state", sm.get("hetero_steady_tok_s")),
        (
            "hetero 2 stages, one at a time",
            het.get("pipeline", {}).get("one_at_a_time", {}).get("tokens_per_s"),
        ),
    ]
    best = sec.get("best", {}).get("pipeline")
    if best:
        rows.append((f"hetero pinned at k={sm.get('sweep_best_k')}", best["tokens_per_s"]))
    print("| way | tokens/s |\n| --- | ---: |")
    for name, v in rows:
        print(f"| {name} | {f(v)} |")
    print(
        f"speedup (hetero / best one-GPU eager): {f(sm.get('speedup'), '{:.2f}')}x (goal 1.7x); "
        f"vs outputs-to-host loop {f(sm.get('speedup_vs_to_host'), '{:.2f}')}x; "
        f"outputs vs one GPU: max rel err {f(sm.get('hetero_vs_one_device_rel_err'), '{:.1e}')}"
    )
    plan = het.get("plan", {})
    print(
        f"plan: k={plan.get('k')} blocks on the first GPU"
        + (
            f" (cut inside block {plan['cut_inside_block']})"
            if plan.get("cut_inside_block") is not None
            else ""
        )
        + f", {plan.get('devices')}, predicted "
        f"{f(plan.get('predicted_ms_per_microbatch'), '{:.2f}')} ms/microbatch; "
        f"{plan.get('note') or 'two GPU stages from the first plan'}"
    )
    alt = het.get("plan_measured_link")
    if alt:
        print(f"plan with the measured GPU<->GPU link ({alt['GBps']:.1f} GB/s): k={alt.get('k')}")
    table = sw.get("sweep", {})
    if table:
        pred = het.get("predicted_curve", {}).get("per_k", {})
        print("\nboundary sweep (bare compiled graph, steady state per microbatch):")
        print(
            "| k | measured ms | tokens/s | predicted ms (planner) |\n| ---: | ---: | ---: | ---: |"
        )
        for k, v in table.items():
            p = pred.get(k, pred.get(int(k), {})) if pred else {}
            mark = " (plan)" if str(sm.get("planner_k")) == k else ""
            mark += " (best)" if str(sm.get("sweep_best_k")) == k else ""
            print(
                f"| {k}{mark} | {statistics.median(v['period_ms']):.2f} | {v['tokens_per_s']:,.0f} | "
                f"{f(p.get('max_ms'), '{:.2f}')} |"
            )
        print(
            f"planner k={sm.get('planner_k')}: {f(sm.get('sweep_planner_k_tok_s'))} tok/s; best "
            f"k={sm.get('sweep_best_k')}: {f(sm.get('sweep_best_tok_s'))} tok/s; within "
            f"{f(100 * sm['planner_within'] if 'planner_within' in sm else None, '{:.1f}')}% "
            "(goal 5%)"
        )
    oc = sw.get("output_cost")
    if oc:
        med = {o: statistics.median(v["period_ms"]) for o, v in oc.items() if isinstance(v, dict)}
        print(
            f"returning the hidden states to the caller at k={oc['k']}: {med.get('hidden', 0):.2f} "
            f"ms per microbatch; the last token only: {med.get('last', 0):.2f} ms"
        )
    hops = sw.get("hops", {}).get("rows", [])
    peer = {r["bytes"]: r for r in het.get("peer", {}).get("rows", [])}
    if hops:
        print(f"\nper hop ({sw['hops']['transport']} through the compiled graph; torch peer copy):")
        print(
            "| bytes | round trip us | + us over 4 KiB | GB/s | peer copy 0->1 us | GB/s |\n"
            "| ---: | ---: | ---: | ---: | ---: | ---: |"
        )
        for r in hops:
            p = peer.get(r["bytes"], {}).get("0->1", {})
            tag = " (pipeline payload)" if r.get("pipeline_payload") else ""
            print(
                f"| {r['bytes']:,}{tag} | {r['round_trip_us']:,.0f} | {r['extra_us']:,.0f} | "
                f"{f(r.get('GBps'), '{:.1f}')} | {f(p.get('us'), '{:.1f}')} | "
                f"{f(p.get('GBps'), '{:.1f}')} |"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "pipeline_2gpu.json"))
    ap.add_argument("--tiny", action="store_true", help="tiny GPT-2 on CPU devices (smoke test)")
    ap.add_argument(
        "--output",
        choices=("hidden", "last"),
        default="hidden",
        help="what the model returns: last_hidden_state, or its last token only",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of: hetero, sweep, compile, best, peer, baseline, hop, measured-link",
    )
    ap.add_argument("--budget-s", type=float, default=None, help="start no section past this")
    ap.add_argument("--grace-s", type=float, default=60.0, help="a child may run this far past it")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--width", type=int, default=None)
    ap.add_argument("--heads", type=int, default=None)
    ap.add_argument("--batch", type=int, default=None, help="sequences in the whole batch")
    ap.add_argument("--seq", type=int, default=None, help="tokens per sequence")
    ap.add_argument("--microbatches", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None, help="timed runs per measurement")
    ap.add_argument("--sweep-mb", type=int, default=10, help="microbatches per boundary, 1st pass")
    ap.add_argument("--refine-mb", type=int, default=16)
    ap.add_argument("--refine-rounds", type=int, default=2)
    ap.add_argument("--refine-top", type=int, default=4, help="best boundaries measured again")
    ap.add_argument("--force-best", action="store_true", help="run `best` even if not needed")
    ap.add_argument("--cache-root", default=None, help="hetero's artifacts go under it (~3 GB)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-json", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--setup", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--planner-k", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pin-k", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.skip = [x for x in args.skip.split(",") if x]
    if args.child:
        child_main(args)
        return
    os.environ["PIPE2_T0"] = str(T0)
    s = make_setup(args)
    # one folder for this run's artifacts, removed at the end even if a child was killed
    args.cache_root = tempfile.mkdtemp(prefix="pipe2-run-", dir=args.cache_root)
    budget = args.budget_s if args.budget_s is not None else (170.0 if s.tiny else 420.0)
    times = TINY_TIMES if s.tiny else GPU_TIMES
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    lib = nccl_lib_dir() if s.gpu else None
    if lib and lib not in os.environ.get("LD_LIBRARY_PATH", "").split(":"):
        # children, their Ray raylet and workers inherit it
        os.environ["LD_LIBRARY_PATH"] = ":".join(
            x for x in (lib, os.environ.get("LD_LIBRARY_PATH")) if x
        )
    res: dict = {"meta": environment(s), "sections": {}, "summary": {}}
    res["meta"]["nccl_lib_dir"] = lib
    res["meta"]["budget_s"] = budget

    def save() -> None:
        res["summary"] = summarize(res, s)
        out.write_text(json.dumps(res, indent=1, default=str))

    save()
    if s.gpu:
        print(res["meta"].get("nvidia_smi", ""), "\n", res["meta"].get("topology", ""), flush=True)
    log(f"setup {asdict(s)}; budget {budget:.0f} s (+{args.grace_s:.0f} s grace)")

    def section(name: str, extra: list[str]) -> None:
        expect, cap = times[name]
        elapsed = time.time() - T0
        if elapsed + expect > budget:
            res["sections"][name] = {"skipped": f"budget: {elapsed:.0f} s in, needs ~{expect} s"}
            log(f"== {name}: skipped ({res['sections'][name]['skipped']})")
            return
        timeout = max(30.0, min(cap, budget + args.grace_s - elapsed))
        res["sections"][name] = run_child(name, s, args, timeout, extra)
        if s.gpu:
            query = ["nvidia-smi", "--query-gpu=index,memory.used", "--format=csv,noheader"]
            log(f"GPU memory after {name}: {probe(query).replace(chr(10), '; ')}")
        save()

    skipped = set(args.skip)
    if s.tiny:
        skipped.add("compile")  # torch.compile of the tiny model on 2 cores: minutes, no news
    if "hetero" not in skipped:
        section("hetero", [])
    plan = res["sections"].get("hetero", {}).get("plan", {})
    k = plan.get("k")
    if k is None and plan.get("cut_inside_block") is not None:
        k = plan["cut_inside_block"]  # refine around it all the same
    if "sweep" not in skipped:
        section("sweep", ["--planner-k", str(k)] if k else [])
    sm = summarize(res, s)
    # hetero at the measured best split: when the planner's split measured >2% below it
    # (then before torch.compile, which is context, not a goal); the smoke test always
    need = sm.get("planner_within", 0.0) > 0.02 and sm.get("sweep_best_k") != k
    best = "best" not in skipped and sm.get("sweep_best_k") and (need or args.force_best or s.tiny)
    for name in ("best", "compile") if need else ("compile", "best"):
        if name == "best" and best:
            section("best", ["--pin-k", str(sm["sweep_best_k"])])
        elif name == "compile" and "compile" not in skipped:
            section("compile", [])
    save()
    shutil.rmtree(args.cache_root, ignore_errors=True)
    print_report(res, s)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
