"""What a LLaMA-7B decoder layer's split costs as priced, with every matmul shared and with
the trips `split_cost` keeps, over a range of per-hand-off costs (issue 14).

A split layer's hand-offs sit on the host's serial path (the GPU waits for the CPU's rows),
while the bytes a hand-off saves the link overlap other work. GPU runs measured each
hand-off at ~0.2 ms calibrated plus 0.35-0.55 ms more inside a decode step (runs 20 and 22).
The model is built on the meta device: no weights, no GPU.

    .venv/bin/python benchmarks/split_trips.py [--cluster configs/clusters/h200-sxm-node.yaml]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import llm_generate_gpu as gen  # the capped benchmark's model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cluster", default="configs/clusters/h200-sxm-node.yaml")
    ap.add_argument("--handoff-ms", type=float, nargs="+", default=[0.0, 0.2, 0.35, 0.5])
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    from transformers import AutoConfig

    from hetero.cluster.profile import CalibrationProfile, RuntimeProfile
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner import gpu_cpu_split
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.phases import capture_lm

    arch, shape = gen.SHAPES["7b"]  # the capped benchmark's model, two of its layers
    cfg = AutoConfig.for_model(arch, **{**shape, "num_hidden_layers": 2, "vocab_size": 512})
    model = gen.build(cfg, "meta", torch.float16)
    lm = capture_lm(model, batch=1, max_len=256)
    cluster = ClusterSpec.from_yaml(args.cluster)
    gpu = next(d for d in cluster.devices if d.kind == "gpu")
    cpu = cluster.host_cpu(gpu.host)
    group = next(g for g in lm.decode.coarsen(depth=3).groups if g.name == "model.model.layers.1")
    ops = [lm.decode[n] for n in group.nodes]
    rows = []
    every_trips = gpu_cpu_split._MAX_TRIPS
    for h in args.handoff_ms:
        runtime = (RuntimeProfile("local", 0.0, 0.0, split_handoff=h * 1e-3),)
        cm = CostModel(CalibrationProfile("any", runtime=runtime))
        row = {"handoff_ms": h}
        for name, limit in (("every matmul shared", 0), ("trips chosen", every_trips)):
            gpu_cpu_split._MAX_TRIPS = limit
            c = gpu_cpu_split.split_cost(
                lm.decode, group, ops, gpu, cpu, cluster, cm,
                gpu_backend="inductor", cpu_backend="eager",
            )  # fmt: skip
            row[name] = {
                "ms": c.seconds * 1e3, "gpu_share": c.fraction, "handoffs": c.handoffs,
                "whole": [w.split("layers_1_")[-1].removesuffix("_weight") for w in c.whole],
                "link_ms": c.link_s * 1e3, "path_ms": c.path_s * 1e3,
            }  # fmt: skip
        gpu_cpu_split._MAX_TRIPS = every_trips
        rows.append(row)
    print(f"LLaMA-7B decoder layer, float16, {cluster.name}: ms per split layer as priced")
    print("| extra per hand-off | every matmul shared | trips chosen | streamed whole |")
    print("| ---: | --- | --- | --- |")
    for r in rows:
        a, b = r["every matmul shared"], r["trips chosen"]
        print(
            f"| {r['handoff_ms']:.2f} ms | {a['ms']:.2f} ms ({a['handoffs']} trips, "
            f"{a['gpu_share']:.0%} on the GPU) | {b['ms']:.2f} ms ({b['handoffs']} trip(s), "
            f"{b['gpu_share']:.0%}) | {', '.join(b['whole']) or '-'} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cluster": args.cluster, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
