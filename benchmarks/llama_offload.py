"""A 1.1B LLaMA on a GPU capped at a quarter of its weights: hetero's plan (resident +
weights streamed from pinned host memory) against all-on-GPU, accelerate's offload and the
host CPU alone.

    python benchmarks/llama_offload.py --json out.json            # on the GPU box
    python benchmarks/llama_offload.py --tiny --json /tmp/t.json  # a smoke test on a CPU

LlamaForCausalLM(LlamaConfig(hidden 2048, intermediate 5632, 22 layers, 32 heads, 4 KV
heads, vocab 32000, use_cache=False)), random weights, float16 (2.2 GB). Shapes: prefill
4x256 tokens (and, with --phases prefill,decode, the old decode-shaped step: 4x1 tokens
without a KV cache. Real generation with a KV cache is benchmarks/llm_generate_gpu.py
--shape 1.1b --cap-gib 0.512). Its "decode" is a 4x1 forward with no past (the attention
over the prompt is missing); the weights it streams per step are the same as a real decode step's, which is
what bounds the time. Every way runs the same two shapes. Times are medians of
per-request wall times (CUDA synchronised), outputs compared with the uncapped model.

Also reported: hetero's GPU memory (held + peak, against the plan and the cap; and with the
executor's packets dropped after their last reader), per-partition predicted vs measured
(CUDA events per stage), the PCIe Gen3 (12 GB/s) plans with both plans run on a weight link
slowed to 12 GB/s (`WeightStreamer.emulate_link`), and a calibrated cost model's plan.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

T0 = time.perf_counter()
CLUSTER = Path(__file__).resolve().parent.parent / "configs" / "clusters" / "h100-sxm-node.yaml"
BACKENDS = {"gpu": "eager", "cpu": "eager"}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


def config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=512,
            use_cache=False,
        )
    return LlamaConfig(
        hidden_size=2048,
        intermediate_size=5632,
        num_hidden_layers=22,
        num_attention_heads=32,
        num_key_value_heads=4,
        vocab_size=32000,
        use_cache=False,
    )


def build(cfg, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in the target dtype: no 4.4 GB float32 detour
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, iters: int, warmup: int = 2) -> float:
    """Median ms of one call (each call synchronised: one request at a time)."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        sync()
        times = []
        for _ in range(iters):
            t = time.perf_counter()
            fn()
            sync()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def logits(out) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out[0] if isinstance(out, tuple) else out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max())


def capped_cluster(weight_bytes: int, fraction: float):
    from hetero.cluster.spec import ClusterSpec

    return ClusterSpec.from_yaml(CLUSTER).with_device("node0/gpu", memory=weight_bytes * fraction)


def slow_link(cluster, bandwidth: float):
    """The same cluster with every GPU<->CPU link at `bandwidth` bytes/s (PCIe Gen3 x16)."""
    from hetero.cluster.spec import ClusterSpec

    links = tuple(replace(link, bandwidth=bandwidth) for link in cluster.links)
    return ClusterSpec(f"{cluster.name}-pcie3", cluster.devices, links)


def hetero_model(model, ids, cluster, cache_dir: Path, exclude=(), cost_model=None):
    """hetero.compile on a GPU box; without CUDA (--tiny smoke test) the same steps with the
    GPU's stages mapped to the CPU (the weight streamer then hands out host tensors)."""
    import hetero

    if torch.cuda.is_available():
        return hetero.compile(
            model,
            (ids,),
            cluster=cluster,
            backends=BACKENDS,
            cache_dir=cache_dir,
            executor="local",
            exclude=exclude,
            cost_model=cost_model,
        )
    from hetero.backends.registry import default_registry
    from hetero.interfaces.api import CompiledModel
    from hetero.interfaces.api import plan as make_plan
    from hetero.runtime.build import compile_plan, needed_outputs
    from hetero.runtime.executor import LocalExecutor

    graph = hetero.capture(model, (ids,))
    plan = make_plan(graph, cluster, backends=BACKENDS, exclude=exclude, cost_model=cost_model)
    registry = default_registry()
    stages = compile_plan(graph, plan, cluster, cache_dir, registry=registry, example_inputs=(ids,))
    cpu = cluster.device("node0/cpu")
    stages = [replace(s, device=cpu) for s in stages]
    runner = LocalExecutor(stages, needed_outputs(graph), registry)
    return CompiledModel(graph, plan, cluster, stages, runner)


class Timed:
    """A stage runner that records its span: CUDA events on the current stream for a GPU
    stage (the GPU's time for the piece, waits for its weights included, without stopping
    the CPU from running ahead), wall time for a CPU stage."""

    def __init__(self, fn, partition: int, gpu: bool, spans: list) -> None:
        self.fn, self.partition, self.gpu, self.spans = fn, partition, gpu, spans

    def __call__(self, *args):
        t = time.perf_counter()
        if not self.gpu:
            out = self.fn(*args)
            self.spans.append((self.partition, (time.perf_counter() - t) * 1e3, None))
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.fn(*args)
        end.record()
        # the host's own time for the call too: a dispatch-bound stage shows it in both
        self.spans.append((self.partition, (start, end), (time.perf_counter() - t) * 1e3))
        return out


def partition_errors(cm, ids, iters: int, run=None) -> dict:
    """Per plan partition: predicted ms vs measured ms (GPU stages by CUDA events, CPU
    stages by wall time; a streamed partition's pieces summed), mean over `iters`."""
    ex = cm.executor
    spans: list = []
    saved = {i: r.runner for i, r in ex._runners.items()}
    for r in ex._runners.values():
        gpu = r.stage.device.kind == "gpu" and torch.cuda.is_available()
        r.runner = Timed(r.runner, r.stage.plan_index, gpu, spans)
    flat = dict(zip(cm.input_names, (ids,), strict=True))
    run = run or (lambda e, f: e.run(f))
    totals: dict[int, float] = {}
    host: dict[int, float] = {}
    try:
        with torch.no_grad():
            for k in range(iters + 1):
                spans.clear()
                run(ex, flat)
                sync()
                if k == 0:
                    continue  # warm-up
                for part, span, host_ms in spans:
                    ms = span if isinstance(span, float) else span[0].elapsed_time(span[1])
                    totals[part] = totals.get(part, 0.0) + ms / iters
                    host[part] = host.get(part, 0.0) + (host_ms or ms) / iters
    finally:
        for i, r in ex._runners.items():
            r.runner = saved[i]
    table = error_table(cm.plan, totals)
    table["host_ms"] = {str(k): round(v, 3) for k, v in host.items()}
    return table


def error_table(plan, measured: dict[int, float]) -> dict:
    rows = []
    for p in plan.partitions:
        m = measured.get(p.index)
        err = (p.predicted_ms - m) / m if m else None
        rows.append(
            {
                "partition": p.index,
                "device": p.device,
                "weights": p.weights,
                "groups": len(p.groups),
                "predicted_ms": round(p.predicted_ms, 3),
                "measured_ms": round(m, 3) if m is not None else None,
                "error": round(err, 3) if err is not None else None,
            }
        )
    errs = [abs(r["error"]) for r in rows if r["error"] is not None]
    return {
        "rows": rows,
        "median_abs_error": statistics.median(errs) if errs else None,
        "total_predicted_ms": round(sum(p.predicted_ms for p in plan.partitions), 3),
        "total_measured_ms": round(sum(measured.values()), 3),
        "measured": {str(k): v for k, v in measured.items()},
    }


def plan_summary(plan) -> dict:
    parts = [
        {
            "index": p.index,
            "device": p.device,
            "backend": p.backend,
            "weights": p.weights,
            "groups": len(p.groups),
            "param_bytes": p.param_bytes,
            "predicted_ms": round(p.predicted_ms, 3),
        }
        for p in plan.partitions
    ]
    return {"predicted_ms": plan.predicted_ms, "partitions": parts, "memory": dict(plan.memory)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--tiny", action="store_true", help="a tiny LLaMA (smoke test, CPU ok)")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument(
        "--fraction", type=float, default=None, help="GPU cap / weight bytes (0.25; --tiny 0.6)"
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of: accelerate,cpu,eager,slowlink,slowrun,calibrate (plan with the "
        "default cost model)",
    )
    ap.add_argument(
        "--budget-s", type=float, default=300, help="start optional sections before this many s"
    )
    ap.add_argument(
        "--phases",
        default="prefill",
        help="which shapes to run: prefill; decode is the old decode-shaped 4x1 forward "
        "without a KV cache (real decode with a cache: llm_generate_gpu.py --shape 1.1b)",
    )
    ap.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="plan with this calibration profile instead of calibrating here first",
    )
    ap.add_argument("--slow-phases", default="prefill,decode", help="phases whose PCIe3 plan runs")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if args.fraction is None:  # a tiny model's activations and lm_head need a larger share
        args.fraction = 0.6 if args.tiny else 0.25
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    dtype = torch.float16 if cuda else torch.float32
    card = torch.cuda.get_device_name() if cuda else "no GPU (CPU smoke test)"
    cfg = config(args.tiny)
    batch, prompt = (4, 256) if not args.tiny else (4, 16)
    results: dict = {
        "card": card,
        "torch": torch.__version__,
        "model": "tiny LLaMA" if args.tiny else "LLaMA 1.1B (TinyLlama shape), random weights",
        "dtype": str(dtype),
        "shapes": {"prefill": [batch, prompt], "decode": [batch, 1]},
        "rows": [],
    }

    def save() -> None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1))

    def row(way: str, phase: str, ms: float, tokens: int, **extra) -> None:
        r = {"way": way, "phase": phase, "ms": round(ms, 3), "tokens_per_s": tokens / ms * 1e3}
        r.update(extra)
        results["rows"].append(r)
        log(f"{way:<28} {phase:<8} {ms:9.2f} ms  {r['tokens_per_s']:10.0f} tok/s  {extra}")
        save()

    if cuda:  # the link's pinned copy rate here: the streaming bound is bytes / this
        host = torch.empty(2**30, dtype=torch.uint8).pin_memory()
        dst = torch.empty_like(host, device=dev)
        ms = timed(lambda: dst.copy_(host, non_blocking=True), 5, warmup=1)
        results["pinned_h2d_GBps"] = host.numel() / ms / 1e6
        log(f"pinned host->GPU copy: {results['pinned_h2d_GBps']:.1f} GB/s")
        del host, dst
    log(f"building {results['model']} on {dev} ({card})")
    model = build(cfg, dev, dtype)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    results["weight_bytes"] = weight_bytes
    cap = weight_bytes * args.fraction
    results["gpu_cap_bytes"] = cap
    g = torch.Generator().manual_seed(1)
    shapes = {"prefill": (batch, prompt), "decode": (batch, 1)}
    shapes = {k: v for k, v in shapes.items() if k in args.phases.split(",")}
    ids = {k: torch.randint(0, cfg.vocab_size, s, generator=g).to(dev) for k, s in shapes.items()}
    tokens = {k: s[0] * s[1] for k, s in shapes.items()}

    # ---- 1. all on the GPU, no cap (the reference outputs) -------------------------------
    ref = {}
    with torch.no_grad():
        for phase, x in ids.items():
            ref[phase] = logits(model(x)).float().cpu()
            ms = timed(lambda x=x: model(x), args.iters)
            row("all on the GPU (no cap)", phase, ms, tokens[phase])

    # ---- 2. hetero: calibrate, plan under the cap, compile, run -----------------------------
    cluster = capped_cluster(weight_bytes, args.fraction)
    cmodel = cost_model(args, skip, results, cluster, cuda)
    graphs = {}
    fast_plans = {}
    with tempfile.TemporaryDirectory(prefix="hetero-llama-") as cache:
        for phase, x in ids.items():
            log(
                f"hetero.compile ({phase} shape {tuple(x.shape)}), GPU capped at {cap / 1e9:.3f} GB"
            )
            before = torch.cuda.memory_allocated() if cuda else 0
            # --tiny: the CPU only hosts weights, so the smoke test exercises streaming
            exclude = ("node0/cpu",) if args.tiny else ()
            cm = hetero_model(model, x, cluster, Path(cache) / phase, exclude, cmodel)
            held = (torch.cuda.memory_allocated() - before) if cuda else 0
            graphs[phase] = cm.graph
            log("compiled; stages: " + ", ".join(f"{s.name}:{s.weights[0]}" for s in cm.stages))
            with torch.no_grad():
                out = logits(cm(x))
            diff = max_diff(out, ref[phase])
            if cuda:
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
            ms = timed(lambda x=x, cm=cm: cm(x), args.iters)
            log(f"first call (with torch.compile of the streamed pieces) done; {ms:.2f} ms/request")
            peak = (torch.cuda.max_memory_allocated() - base) if cuda else 0
            planned = dict(cm.plan.memory).get("node0/gpu", 0)
            log(
                f"GPU memory: held {held / 1e6:.1f} MB + peak {peak / 1e6:.1f} MB = "
                f"{(held + peak) / 1e6:.1f} MB; planned {planned / 1e6:.1f} MB; "
                f"cap {cap / 1e6:.1f} MB"
            )
            streamers = getattr(cm.executor, "streamers", {})
            streamed = sum(sum(s.item_bytes) for s in streamers.values())
            rate = results.get("pinned_h2d_GBps")
            bound = streamed / rate / 1e6 if rate else 0.0
            row(
                "hetero (plan under the cap)",
                phase,
                ms,
                tokens[phase],
                max_abs_diff_vs_uncapped=diff,
                gpu_bytes_held=held,
                gpu_peak_extra_bytes=peak,
                streamed_bytes_per_forward=streamed,
                streaming_bound_ms=round(bound, 3),
                stream_slot_bytes=sum(s.device_bytes for s in streamers.values()),
                plan_predicted_ms=round(cm.plan.predicted_ms, 3),
                gpu_bytes_total=held + peak,
                gpu_bytes_planned=planned,
                under_cap=bool(held + peak <= cap),
            )
            pe = partition_errors(cm, x, args.iters)
            results.setdefault("partition_errors", {})[phase] = pe
            log(f"per-partition predicted vs measured (CUDA events): {pe}")
            if cmodel is not None:  # what the datasheet defaults predict for the same plan
                default = default_predictions(cm.graph, cm.plan, cluster)
                pd = error_table(default, {int(k): v for k, v in pe["measured"].items()})
                results.setdefault("partition_errors_default_model", {})[phase] = pd
                log(f"same plan, default cost model: median |error| {pd['median_abs_error']}")
            save()
            if "slowrun" not in skip and "slowlink" not in skip and cuda and rate:
                # the same plan with its weight copies slowed to PCIe Gen3's 12 GB/s
                for st in streamers.values():
                    st.emulate_link(12e9, rate * 1e9)
                ms_s = timed(lambda x=x, cm=cm: cm(x), 3, warmup=1)
                for st in streamers.values():
                    st.emulate_link(rate * 1e9, rate * 1e9)  # back to the real link
                row(
                    "12 GB/s emulated: fast-link plan",
                    phase,
                    ms_s,
                    tokens[phase],
                    plan_predicted_ms=round(cm.plan.predicted_ms, 3),
                    planned_for=cluster.name,
                )
            if "eager" not in skip:
                eager_row(cm, x, ref[phase], row, phase, tokens[phase], args.iters)
            results.setdefault("plans", {})[phase] = plan_summary(cm.plan)
            fast_plans[phase] = cm.plan
            text = cm.plan.explain()
            results.setdefault("explain", {})[phase] = text
            print(text, flush=True)
            cm.shutdown()
            del cm
            if cuda:
                torch.cuda.empty_cache()

        # ---- 3. a PCIe Gen3 link (12 GB/s): its plans, and both plans run on it --------
        if "slowlink" not in skip:
            ctx = dict(
                model=model,
                ids=ids,
                ref=ref,
                tokens=tokens,
                graphs=graphs,
                cache=cache,
                cost_model=cmodel,
            )
            slow_link_section(args, skip, results, row, ctx, cluster, fast_plans)
            save()

    # ---- 4. host CPU only, bf16 --------------------------------------------------------------
    model = model.cpu()
    if cuda:
        torch.cuda.empty_cache()
    if "cpu" not in skip:
        threads = 16 if not args.tiny else torch.get_num_threads()
        torch.set_num_threads(threads)
        cpu_model = model.to(torch.bfloat16)
        for phase, x in ids.items():
            xc = x.cpu()
            iters = 3 if phase == "prefill" else max(3, args.iters // 2)
            with torch.no_grad():
                diff = max_diff(logits(cpu_model(xc)), ref[phase])
            ms = timed(lambda xc=xc: cpu_model(xc), iters, warmup=1)
            row(f"host CPU only, bf16 ({threads} thr)", phase, ms, tokens[phase], max_abs_diff=diff)
        model = cpu_model.to(dtype)

    # ---- 5. accelerate device_map="auto" with the same cap -----------------------------------
    if "accelerate" not in skip and cuda:
        try:
            from accelerate import dispatch_model, infer_auto_device_map
        except ImportError as e:
            log(f"accelerate skipped: {e}")
        else:
            max_memory = {0: int(cap), "cpu": 200 * 2**30}
            device_map = infer_auto_device_map(
                model, max_memory=max_memory, no_split_module_classes=["LlamaDecoderLayer"]
            )
            on_gpu = sum(1 for v in device_map.values() if v == 0)
            log(f"accelerate device_map: {on_gpu} of {len(device_map)} modules on the GPU")
            acc = dispatch_model(model, device_map=device_map)
            for phase, x in ids.items():
                with torch.no_grad():
                    diff = max_diff(logits(acc(x)), ref[phase])
                ms = timed(lambda x=x: acc(x), 3, warmup=1)
                row('accelerate device_map="auto"', phase, ms, tokens[phase], max_abs_diff=diff)

    results["notes"] = [
        "decode = one forward of 4x1 tokens without a KV cache (hetero's captured graph has "
        "none); it streams the same weights a real decode step does",
        "hetero runs through hetero.compile with backends "
        f"{BACKENDS}; streamed pieces are eager artifacts with weights as inputs, run through "
        "torch.compile (Inductor, no CUDA graphs) by default, or op by op (the 'eager' row)",
        "gpu_bytes_held / gpu_peak_extra_bytes: hetero's own GPU memory (the uncapped reference "
        "model also sits on the GPU in this process and is not counted)",
    ]
    save()
    print_table(results)


def eager_row(cm, x, ref, row, phase, tokens, iters) -> None:
    """The same stages with op-by-op streamed pieces, for comparison."""
    from hetero.runtime.build import needed_outputs
    from hetero.runtime.executor import LocalExecutor

    with LocalExecutor(cm.stages, needed_outputs(cm.graph), stream_runner="eager") as eager_ex:
        flat = dict(zip(cm.input_names, (x,), strict=True))
        out_e = next(iter(eager_ex.run(flat).values()))
        diff_e = max_diff(out_e, ref)
        ms_e = timed(lambda flat=flat, ex=eager_ex: ex.run(flat), iters)
    row("hetero, streamed pieces eager", phase, ms_e, tokens, max_abs_diff_vs_uncapped=diff_e)


def slow_link_section(args, skip, results, row, ctx, cluster, fast_plans) -> None:
    """Plan for a PCIe Gen3 link (12 GB/s), then run both that plan and the fast link's plan
    with the weight streamer's copies slowed to 12 GB/s (WeightStreamer.emulate_link)."""
    import hetero
    from hetero.interfaces.api import plan as make_plan

    slow = slow_link(cluster, 12e9)
    rate = results.get("pinned_h2d_GBps")
    for phase, graph in ctx["graphs"].items():
        log(f"planning {phase} on {slow.name} (GPU<->CPU 12 GB/s)")
        p = make_plan(graph, slow, backends=BACKENDS, cost_model=ctx["cost_model"])
        results.setdefault("plans_pcie3", {})[phase] = plan_summary(p)
        text = p.explain()
        results.setdefault("explain_pcie3", {})[phase] = text
        print(text, flush=True)
        if "slowrun" in skip or not torch.cuda.is_available() or not rate:
            continue
        runs = [("PCIe3 plan", p, slow)] if phase in args.slow_phases.split(",") else []
        for label, plan, spec in runs:
            x = ctx["ids"][phase]
            try:
                model, g = ctx["model"], graph
                if any(q.device.endswith("/cpu") for q in plan.partitions):
                    # partitions for the CPU are built from a host copy of the model (a CUDA
                    # model's CPU partition keeps CUDA constants: see the report)
                    model = copy.deepcopy(ctx["model"]).cpu()
                    x = x.cpu()
                    g = hetero.capture(model, (x,))
                    plan = make_plan(g, spec, backends=BACKENDS, cost_model=ctx["cost_model"])
                    results.setdefault("explain_pcie3_run", {})[phase] = plan.explain()
                cm = hetero.compile(
                    model,
                    (x,),
                    cluster=spec,
                    plan=plan,
                    graph=g,
                    backends=BACKENDS,
                    cache_dir=Path(ctx["cache"]) / f"{phase}-{spec.name}",
                    executor="local",
                )
            except Exception as e:  # report, keep the rest of the run
                log(f"{label} on 12 GB/s: compile failed: {type(e).__name__}: {e}")
                results.setdefault("errors", []).append(f"{phase} {label}: {e}")
                continue
            try:
                for st in cm.executor.streamers.values():
                    st.emulate_link(12e9, rate * 1e9)
                with torch.no_grad():
                    diff = max_diff(logits(cm(x)), ctx["ref"][phase])
                one = timed(lambda x=x, cm=cm: cm(x), 1, warmup=0)
                iters = 3 if one > 300 else args.iters
                ms = timed(lambda x=x, cm=cm: cm(x), iters, warmup=1)
            except Exception as e:
                log(f"{label} on 12 GB/s: run failed: {type(e).__name__}: {e}")
                results.setdefault("errors", []).append(f"{phase} {label} run: {e}")
                cm.shutdown()
                continue
            row(
                f"12 GB/s emulated: {label}",
                phase,
                ms,
                ctx["tokens"][phase],
                max_abs_diff_vs_uncapped=diff,
                # the PCIe3 plan's prediction is for 12 GB/s; the fast plan's for 54.6 GB/s
                plan_predicted_ms=round(plan.predicted_ms, 3),
                planned_for=spec.name,
                devices=sorted({q.device for q in plan.partitions}),
            )
            cm.shutdown()
            del cm
            torch.cuda.empty_cache()


def cost_model(args, skip, results, cluster, cuda: bool):
    """The cost model hetero plans with here: `hetero calibrate` on this box (its GPU and
    CPU through the backends the plan runs, in the model's dtype: what the product does
    before planning on a new machine), or a saved profile (--profile); None (datasheet
    defaults) with --skip calibrate or without CUDA."""
    from hetero.calibration import calibrate, fit_errors
    from hetero.cluster.profile import CalibrationProfile
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.decisions import BackendAssignment

    if args.profile is not None:
        return CostModel(CalibrationProfile.load(args.profile))
    if "calibrate" in skip or not cuda:
        return None
    t0 = time.perf_counter()
    try:
        assignment = BackendAssignment.parse(BACKENDS)
        profile, _, _ = calibrate(cluster, backends=assignment, dtypes=("float16",), log=log)
    except Exception as e:
        log(f"calibrate failed, planning with the defaults: {type(e).__name__}: {e}")
        results["calibrate_error"] = f"{type(e).__name__}: {e}"
        return None
    results["calibrate_s"] = round(time.perf_counter() - t0, 1)
    results["profile"] = json.loads(profile.to_json(args.json.with_suffix(".profile.json")))
    log(f"calibrated in {results['calibrate_s']} s")
    for row in fit_errors(profile):
        log("fit: " + " ".join(str(round(x, 7) if isinstance(x, float) else x) for x in row))
    for dp in profile.devices:
        log(
            f"{dp.device}: dispatch {1e6 * (dp.launch_overhead or 0):.1f} us "
            f"+ runner {1e6 * dp.runner_overhead:.1f} us/op, view {1e6 * (dp.view_overhead or 0):.1f}"
            f" us, partition call {1e6 * (dp.call_overhead or 0):.1f} us"
        )
    return CostModel(profile)


def default_predictions(graph, plan, cluster):
    """`plan`'s partitions priced by the default (uncalibrated) cost model."""
    from hetero.interfaces.api import plan as make_plan

    pins = {g: q.device for q in plan.partitions for g in q.groups}
    again = make_plan(graph, cluster, backends=BACKENDS, pins=pins)
    if [q.nodes for q in again.partitions] != [q.nodes for q in plan.partitions]:
        return replace(plan, partitions=())  # not the same partitions: nothing to compare
    return again


def print_table(results: dict) -> None:
    by = {}
    for r in results["rows"]:
        by.setdefault(r["way"], {})[r["phase"]] = r
    print(f"\n{results['model']}, {results['dtype']}, on {results['card']}")
    print(f"{'way':<30} {'prefill ms':>11} {'tok/s':>9} {'decode ms':>10} {'tok/s':>8}  diff")
    for way, phases in by.items():
        p, d = phases.get("prefill", {}), phases.get("decode", {})
        diff = max(
            (x.get("max_abs_diff_vs_uncapped", x.get("max_abs_diff", 0.0)) for x in (p, d) if x),
            default=0.0,
        )
        print(
            f"{way:<30} {p.get('ms', float('nan')):>11.2f} {p.get('tokens_per_s', 0):>9.0f} "
            f"{d.get('ms', float('nan')):>10.2f} {d.get('tokens_per_s', 0):>8.0f}  {diff:.3g}"
        )


if __name__ == "__main__":
    main()
