"""Where a `split` decoder layer's time goes (issue 14): a LLaMA-7B-wide model (hidden 4096,
intermediate 11008, 32 heads, float16) with every decoder layer forced to `split`, so each
one streams its GPU rows over the link while the host CPU multiplies the rest.

    python benchmarks/split_layer_gpu.py --json $OUT/split.json --trace $OUT/split_trace.json

Three measurements, each in this process:

1. copies: how long a small copy (one activation) takes on the compute stream, alone and
   while a layer's weights stream on the copy stream in pieces of each size in --chunks
   (the copy engine may serve one stream's copy before the next one's);
2. cpu: the host CPU's rate on each of a split layer's four products (q/k/v, o, gate/up,
   down) at the layer's planned share, alone and while the link copies;
3. layers: hetero's decode, ms per token and per split layer, predicted against measured;
   a profile of decode steps (host-side op times, copy spans).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import llm_generate_gpu as gen

MIB = 1 << 20
RESULTS: dict = {}


def tag(chunk: int) -> str:
    return "whole" if not chunk else f"{chunk // MIB}MiB" if chunk >= MIB else f"{chunk}B"


def small_copy_latency(chunks: list[int], item_bytes: int, repeats: int = 20) -> dict:
    """Median ms of an 8 KiB host->GPU copy, the same bytes read by a kernel from pinned
    memory, and a GPU->host copy, each on the compute stream, alone and
    while `item_bytes` stream host->GPU on a side stream in pieces of each chunk size."""
    from hetero.backends.gpu_cpu_mm import _STAGING, from_host

    dev = torch.device("cuda")
    big_src = torch.empty(item_bytes, dtype=torch.uint8).pin_memory()
    big_dst = torch.empty(item_bytes, dtype=torch.uint8, device=dev)
    h = torch.zeros(4096, dtype=torch.float16).pin_memory()
    d = torch.zeros(4096, dtype=torch.float16, device=dev)
    side = torch.cuda.Stream(dev)
    main = torch.cuda.current_stream(dev)

    def one(chunk: int | None, direction: str) -> float:
        torch.cuda.synchronize()
        if chunk is not None:
            with torch.cuda.stream(side):
                step = chunk or item_bytes
                for at in range(0, item_bytes, step):
                    big_dst[at : at + step].copy_(big_src[at : at + step], non_blocking=True)
            torch.cuda._sleep(200_000)  # the small copy lands mid-stream, not first
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(main)
        if direction == "h2d":
            d.copy_(h, non_blocking=True)
        elif direction == "h2d_read":  # what gpu_cpu_mm does: a kernel reads pinned memory
            y_host, y_dev = _STAGING.get(dev, "bench", (4096,), torch.float16)
            from_host(y_host, y_dev, dev, torch.float16)
        else:
            h.copy_(d, non_blocking=True)
        end.record(main)
        torch.cuda.synchronize()
        return start.elapsed_time(end)

    out = {}
    for direction in ("h2d", "h2d_read", "d2h"):
        out[f"{direction}_alone_ms"] = statistics.median(
            one(None, direction) for _ in range(repeats)
        )
        for c in chunks:
            key = f"{direction}_while_streaming_{tag(c)}_ms"
            out[key] = statistics.median(one(c, direction) for _ in range(repeats))
    out["item_bytes"] = item_bytes
    return out


def cpu_products(fraction: float, repeats: int = 30) -> dict:
    """Median ms and GB/s of each of a split layer's CPU products (float16, batch 1), alone and
    while the link copies 256 MiB pieces back to back."""
    from hetero.runtime.split_linear import gpu_rows

    shapes = {
        "qkv": (3 * (4096 - gpu_rows(4096, fraction)), 4096),
        "o": (4096 - gpu_rows(4096, fraction), 4096),
        "gate_up": (2 * (11008 - gpu_rows(11008, fraction)), 4096),
        "down": (4096 - gpu_rows(4096, fraction), 11008),
    }
    dev = torch.device("cuda")
    src = torch.empty(256 * MIB, dtype=torch.uint8).pin_memory()
    dst = torch.empty(256 * MIB, dtype=torch.uint8, device=dev)
    side = torch.cuda.Stream(dev)
    out = {"fraction": fraction, "threads": torch.get_num_threads()}
    for name, (rows, cols) in shapes.items():
        ws = [torch.randn(rows, cols, dtype=torch.float16) for _ in range(6)]  # > the LLC
        x = torch.randn(1, cols, dtype=torch.float16)
        y = torch.empty(1, rows, dtype=torch.float16)
        torch.mm(x, ws[0].t(), out=y)
        for busy in (False, True):
            times = []
            for k in range(repeats):
                if busy and k % 4 == 0:
                    with torch.cuda.stream(side):
                        for _ in range(4):
                            dst.copy_(src, non_blocking=True)
                t = time.perf_counter()
                torch.mm(x, ws[k % len(ws)].t(), out=y)
                times.append(time.perf_counter() - t)
            torch.cuda.synchronize()
            ms = statistics.median(times) * 1e3
            nbytes = rows * cols * 2
            state = "shared" if busy else "alone"
            out[f"{name}_{state}_ms"] = ms
            out[f"{name}_{state}_GBps"] = nbytes / ms / 1e6
        out[f"{name}_MiB"] = rows * cols * 2 / MIB
    return out


def layer_times(args, trace: str | None) -> dict:

    gpu = torch.cuda.is_available()  # without one: a tiny model, a smoke test of the steps
    cfg = gen.config(not gpu)
    cfg.num_hidden_layers = args.layers
    model = gen.build(cfg, "cuda" if gpu else "cpu", torch.float16 if gpu else torch.float32)
    model = model.to("cpu")
    if gpu:
        torch.cuda.empty_cache()
    spec = gen.cluster(args.cap_gib if gpu else 0.002)
    out: dict = {"layers": args.layers, "cap_gib": args.cap_gib}
    kw = {"cost_model": gen.split_cost_model(spec, 1, out)} if gpu else {}
    forced = {"model.model.layers.": "split"}
    cache = Path(tempfile.mkdtemp(prefix="hetero-split-"))
    t = time.perf_counter()
    lm, _ = gen.compile_lm(
        model, spec, args.max_len, 1, cache, prompt_length=args.prompt,
        decode_placements=forced, **kw,
    )  # fmt: skip
    out["compile_s"] = time.perf_counter() - t
    out["explain"] = lm.explain(width=200)
    out["predicted_ms_per_token"] = lm.plan.predicted_decode_ms
    gen.log(f"compiled in {out['compile_s']:.1f} s\n{lm.explain(width=160)}")
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (1, args.prompt))
    r = gen.hetero_times(lm, ids, args.new_tokens, args.repeats)
    r["partitions"] = gen.plan_rows(lm)["decode"]
    out["run"] = r
    gen.log(
        f"decode {r['ms_per_token']:.2f} ms/token (predicted {out['predicted_ms_per_token']:.2f})"
    )
    if args.sync_too:
        # the same stages, each hand-off made by the launching thread (not overlapped)
        tokens = lm.generate(ids, args.new_tokens)
        out["sync_handoffs"] = gen.rebound(lm, ids, args, tokens=tokens, overlap_handoffs=False)
        gen.log(f"hand-offs not overlapped: {out['sync_handoffs']}")
        return out  # rebound released lm's stages
    if trace:
        lm.generate(ids, 3)
        with torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        ) as prof:
            lm.generate(ids, 3)
        if gpu:
            torch.cuda.synchronize()
        out["profile"] = prof.key_averages().table(
            sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=50
        )
        events = [
            {"name": e.name[:60], "thread": e.thread, "device": str(e.device_type).split(".")[-1],
             "start_us": e.time_range.start, "dur_us": e.time_range.end - e.time_range.start}
            for e in prof.events()
            if str(e.device_type).endswith("CUDA")
            or e.name.startswith(("aten::mm", "hetero::", "cudaEventSynchronize", "Memcpy",
                                  "cudaMemcpyAsync", "aten::copy_", "cudaStreamWaitEvent",
                                  "aten::mul", "aten::_to_copy", "cudaLaunchKernel"))
        ]  # fmt: skip
        Path(trace).write_text(json.dumps(events))
    lm.shutdown()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", help="write the results here (rewritten after each part)")
    ap.add_argument("--trace", help="write the profiled decode steps' copy/op spans here")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--cap-gib", type=float, default=2.0)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunks", type=int, nargs="*", default=[0, 8 * MIB, 2 * MIB],
                    help="copies: the streamed item's piece sizes in bytes (0: one copy)")  # fmt: skip
    ap.add_argument("--fraction", type=float, default=0.453125, help="GPU share of the rows")
    ap.add_argument("--parts", nargs="*", default=["copies", "cpu", "layers"])
    ap.add_argument("--sync-too", action="store_true",
                    help="layers: also time them with hand-offs not overlapped (no trace then)")  # fmt: skip
    args = ap.parse_args()
    gpu = torch.cuda.is_available()
    RESULTS["machine"] = {"gpu": torch.cuda.get_device_name() if gpu else None, "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "args": vars(args)}  # fmt: skip
    gen.RESULTS = RESULTS

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(RESULTS, indent=1, default=str))

    if "copies" in args.parts and gpu:
        RESULTS["copies"] = small_copy_latency(args.chunks, 175 * MIB)
        gen.log(f"copies {RESULTS['copies']}")
        save()
    if "cpu" in args.parts and gpu:
        RESULTS["cpu"] = cpu_products(args.fraction)
        gen.log(f"cpu {RESULTS['cpu']}")
        save()
    if "layers" in args.parts:
        RESULTS["layers"] = layer_times(args, args.trace)
        save()
    gen.log("done")


if __name__ == "__main__":
    main()
