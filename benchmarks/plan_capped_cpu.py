"""The capped LLaMA-7B's generation plan, made on this CPU from a GPU run's recorded rates:
which placements the planner picks and what it prices them at, under the rates a run
calibrated and under what-if rates (no GPU needed: the model is built on the meta device,
nothing is allocated; capture ~35 s, each plan ~1.5 s).

    .venv/bin/python benchmarks/plan_capped_cpu.py \\
        [--run benchmarks/results/llm_generate_run18_capped.json] [--cpu-shared-gbps 35 50] \
        [--dram-gbps 90]

Each row: the decode plan's layers by placement, its predicted ms per token and time to
first token, and the bytes it reads from host memory per token (weights not resident on
the GPU: streamed over the link or read by the CPU) with what they take at the run's
measured DRAM rate where the run recorded one, or `--dram-gbps` (both at once, sharing the
host's memory).
`--cpu-shared-gbps X`: the CPU's matrix-vector rate while the link copies set to X GB/s
in every dtype (scaled from the recorded one), as a calibration that reads from DRAM
rather than from the last-level cache would measure it (run 18's trace: 33-35 GB/s;
its calibration, whose copies stayed in a 300 MiB L3: 65.9).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import llm_generate_gpu as gen  # noqa: E402  (the benchmark's model and cluster)


def plan_row(
    lm,
    spec,
    rates,
    label: str,
    handoff_s: float = 0.0,
    stream_call_s: float = 0.0,
    split_cpu: float | None = None,
    host_precision: str = "model",
) -> dict:
    from hetero.backends.registry import default_registry
    from hetero.calibration.split import split_profile
    from hetero.cluster.profile import RuntimeProfile
    from hetero.partitioner.algorithms.generation import plan_generation
    from hetero.partitioner.cost import SPLIT_CPU_PRIOR, CostModel
    from hetero.partitioner.phases import Phase

    profile = split_profile(spec, spec.device("node0/gpu"), tuple(rates))
    if handoff_s or stream_call_s or split_cpu is not None:
        # what a feedback round folds in (calibration/generation.py); the split's CPU term
        # not given: the cost model's prior (SPLIT_CPU_PRIOR), as a first plan prices it
        runtime = RuntimeProfile(
            "local",
            0.0,
            0.0,
            split_handoff=handoff_s,
            stream_call=stream_call_s,
            split_cpu=split_cpu if split_cpu is not None else SPLIT_CPU_PRIOR,
        )
        profile = dataclasses.replace(profile, runtime=(runtime,))
    cm = CostModel(profile)
    plan = plan_generation(
        lm, spec, registry=default_registry(), cost_model=cm, host_precision=host_precision
    )

    def layers(phase: Phase) -> Counter:
        return Counter(
            " ".join(c.chosen.split()[1:2]) or c.chosen
            for c in plan.choice(phase)
            if c.group.rsplit(".", 1)[-1].isdigit()
        )

    # an embedding table is read one row per token: left out
    host = sum(
        p.param_bytes
        for p in plan.decode.partitions
        if (p.device != "node0/gpu" or p.weights != "resident")
        and not all("embed" in g for g in p.groups)
    )
    return {
        "rates": label,
        "layers": dict(layers(Phase.DECODE)),
        "prefill_layers": dict(layers(Phase.PREFILL)),
        "decode_ms": plan.predicted_decode_ms,
        "ttft_ms": plan.predicted_ttft_ms,
        "host_bytes_per_token": host,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", default=str(HERE / "results/llm_generate_run18_capped.json"))
    ap.add_argument("--cpu-shared-gbps", type=float, nargs="*", default=[35.0])
    ap.add_argument("--cap-gib", type=float, default=4.0)
    ap.add_argument("--dram-gbps", type=float,
                    help="the host memory rate link and CPU share (default: the run's probe "
                    "of both at once, where it has one)")  # fmt: skip
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument(
        "--handoff-extra-ms",
        type=float,
        default=0.0,
        help="each split hand-off's cost beyond its calibrated copies, as a feedback "
        "round measures it (runs 20 and 22, round 1: 0.55, 0.45)",
    )
    ap.add_argument(
        "--stream-call-ms",
        type=float,
        default=0.0,
        help="each streamed layer's call beyond its price (run 22, round 1: 1.35)",
    )
    ap.add_argument(
        "--split-cpu",
        type=float,
        default=None,
        help="a split's CPU rows' time beyond calibrated, per second of it, as a feedback "
        "round fits it (run 26: the split LM head ran ~0.9 longer; run 36, timed: 0.46); "
        "default: the cost model's prior before any run (partitioner/cost.py "
        "SPLIT_CPU_PRIOR, 0.3); 0: as calibrated",
    )
    ap.add_argument(
        "--host-precision",
        choices=("model", "fastest"),
        default="model",
        help="the planner's HostPrecision: 'fastest' lets the host run bfloat16 copies of a "
        "float16 model (what runs before 2026-12-06 planned; run 28's plan)",
    )
    args = ap.parse_args()

    from hetero.calibration.split import SplitRates
    from hetero.partitioner.phases import capture_lm

    run = json.loads(Path(args.run).read_text())["capped"]
    recorded = [SplitRates(**r) for r in run["split_rates"]]
    probe = run.get("probe", {})
    shared = args.dram_gbps or (
        probe.get("shared_h2d_GBps", 0) + probe.get("shared_cpu_read_GBps", 0)
    )
    model = gen.build(gen.config(False), "meta", torch.float16)
    lm = capture_lm(model, batch=1, max_len=256, example_len=128)
    spec = gen.cluster(args.cap_gib)
    f16 = next(r for r in recorded if r.dtype == "float16")
    extra = {
        "host_precision": args.host_precision,
        "handoff_s": args.handoff_extra_ms * 1e-3,
        "stream_call_s": args.stream_call_ms * 1e-3,
        "split_cpu": args.split_cpu,
    }
    label = f"recorded (float16 CPU {f16.cpu_shared / 1e9:.1f})"
    if args.handoff_extra_ms or args.stream_call_ms or args.split_cpu is not None:
        label += (
            f", hand-off +{args.handoff_extra_ms:g} ms, streamed call +{args.stream_call_ms:g} ms"
        )
    if args.split_cpu is not None:
        label += f", split CPU rows +{args.split_cpu:.0%}"
    else:
        label += ", split CPU rows at the prior"
    rows = [plan_row(lm, spec, recorded, label, **extra)]
    for gbps in args.cpu_shared_gbps:
        scaled = [dataclasses.replace(r, cpu_shared=r.cpu_shared * gbps * 1e9 / f16.cpu_shared)
                  for r in recorded]  # fmt: skip
        rows.append(
            plan_row(lm, spec, scaled, f"float16 CPU {gbps:.1f} while the link copies", **extra)
        )
    print(f"{Path(args.run).name}: GPU capped at {args.cap_gib} GiB; DRAM {shared or '-'} GB/s")
    print("| rates (GB/s) | decode layers | decode ms | prefill layers | TTFT ms | host GB/token "
          "| at DRAM |")  # fmt: skip
    print("| --- | --- | ---: | --- | ---: | ---: | ---: |")
    for r in rows:
        at = f"{r['host_bytes_per_token'] / (shared * 1e9) * 1e3:.1f} ms" if shared else "-"
        layers, pre = (", ".join(f"{n} {k}" for k, n in sorted(r[key].items()))
                       for key in ("layers", "prefill_layers"))  # fmt: skip
        print(f"| {r['rates']} | {layers} | {r['decode_ms']:.1f} | {pre} | {r['ttft_ms']:.1f} | "
              f"{r['host_bytes_per_token'] / 1e9:.2f} | {at} |")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
