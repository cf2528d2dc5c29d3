"""Generation over Ray: the decode plan's predicted ms per token against what it measures,
before any feedback (issue 16).

The setup of the Ray generation tests (tests/runtime/test_generation.py): a 2-layer LLaMA
(hidden 64, vocab 512) on configs/clusters/dev-box-npu.yaml, layer 1 pinned to the emulated
NPU (eager there), the rest on the CPU, each device in its own Ray actor. The plan is made as
`hetero.compile(..., task="generate", executor=...)` makes it (no calibration profile: a
fresh cache, as on a CI machine); then `--requests` requests of `--tokens` new tokens each,
the median decode ms per token of the warm ones against the plan's prediction. `--executor
local` runs the same plan in-process, for the share of the gap that Ray's calls make.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/ray_decode_pricing.py \
        [--executor ray|local] [--requests 6] [--tokens 32] [--json PATH]

Numbers taken on the shared 2-core development box are noisy: the JSON records the load
average before and after.
"""

from __future__ import annotations

import os

# hetero's own processes run so (hetero/environment.py); OpenMP reads it when torch loads
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from hetero.backends.registry import default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.generate import compile_lm
from hetero.partitioner.phases import Phase

CLUSTER = Path(__file__).resolve().parent.parent / "configs/clusters/dev-box-npu.yaml"


def tiny_llama() -> torch.nn.Module:
    """The generation tests' LLaMA (tests/llm_models.py `llama_lm`), random weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512, initializer_range=0.2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval()


def measure(executor: str, requests: int, tokens: int) -> dict:
    cache = Path(tempfile.mkdtemp(prefix="ray-decode-pricing-"))
    os.environ["HETERO_CACHE_DIR"] = str(cache)  # no calibration profile: the defaults price
    lm = compile_lm(
        tiny_llama(), ClusterSpec.from_yaml(CLUSTER), max_length=64, cache_dir=cache,
        registry=default_registry(), executor=executor, backends={"npu": "eager"},
        pins={"model.model.layers.1": "npu"},
    )  # fmt: skip
    try:
        prompt = torch.randint(0, 512, (1, 11), generator=torch.Generator().manual_seed(1))
        per_token = []
        for _ in range(requests):
            lm.generate(prompt, tokens)
            per_token.append(lm.last_request["decode_ms_per_token"])
        warm = per_token[1:] or per_token  # the first request after the build runs cold
        measured = statistics.median(warm)
        plan = lm.plan.decode
        _, snap = lm.generation.measured(Phase.DECODE)
        return {
            "executor": executor,
            "predicted_ms_per_token": lm.plan.predicted_decode_ms,
            "measured_ms_per_token": measured,
            "measured_over_predicted": measured / lm.plan.predicted_decode_ms,
            "requests_ms_per_token": per_token,
            "partitions": [
                {"device": p.device, "weights": p.weights, "predicted_ms": p.predicted_ms}
                for p in plan.partitions
            ],
            "transfers": [
                {"src": t.src_device, "dst": t.dst_device, "predicted_ms": t.predicted_ms}
                for t in plan.transfers
            ],
            # what the runtime terms are fitted from (cost.default_runtime's numbers): per
            # stage, its time in the worker beyond the runner's call; per hop (a source of
            # -1: the caller), its values ready -> the stage starting
            "measured_stage_overhead_ms": [s.stage_ms - s.runner_ms for s in snap.stages],
            "measured_hop_wait_ms": {f"{h.src}->{h.dst}": h.wait_ms for h in snap.hops},
        }
    finally:
        lm.shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--executor", choices=("ray", "local"), default="ray")
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--json", default=None, help="also write the result here")
    args = ap.parse_args()
    load_before = os.getloadavg()
    row = measure(args.executor, args.requests, args.tokens)
    row["meta"] = {
        "machine": platform.node(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_before": load_before,
        "load_after": os.getloadavg(),
    }
    print(
        f"{args.executor}: decode predicted {row['predicted_ms_per_token']:.2f} ms/token, "
        f"measured {row['measured_ms_per_token']:.2f} ms/token "
        f"({row['measured_over_predicted']:.2f}x)"
    )
    for p in row["partitions"]:
        print(f"  {p['device']:<10} {p['weights']:<9} {p['predicted_ms']:.3f} ms")
    for t in row["transfers"]:
        print(f"  {t['src']} -> {t['dst']}: {t['predicted_ms']:.3f} ms")
    stage = ", ".join(f"{ms:.3f}" for ms in row["measured_stage_overhead_ms"])
    hops = ", ".join(f"{k} {ms:.3f}" for k, ms in row["measured_hop_wait_ms"].items())
    print(f"  measured: stage overhead ms {stage}; hop waits ms {hops}")
    if args.json:
        Path(args.json).write_text(json.dumps(row, indent=2) + "\n")


if __name__ == "__main__":
    main()
