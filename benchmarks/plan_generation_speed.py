"""How long the latency search takes, and which plans it picks: generation plans of a tiny
LLaMA and of the capped 7B, and random problems like the tests'.

    flock /tmp/cpu_bench.lock .venv/bin/python benchmarks/plan_generation_speed.py \\
        [--7b] [--repeat 3] [--json OUT.json] [--check BEFORE.json]

Rows: the tiny LLaMA of tests/partitioner/test_generation_plan.py (8 layers) on the H200
node with its GPU capped at 0.5/0.6/0.7 of its weights, at batch 16 (cap 0.7) and on
cpu-2core; with `--7b`, plan_capped_cpu.py's LLaMA-7B under run 26's recorded rates (a
~45 s capture on the meta device); then random problems (`random`: the tests' additive ones,
`decode`: overlapped decode steps with memory binding), each row one seed. LLM rows time
plan_generation warm (both phases), random rows `latency()`; each the median of `--repeat`.
Captures are not timed. Every row records the assignment chosen and its predicted seconds
(both phases' choices for plans); `--check` lists rows whose choice differs from an earlier
`--json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests"), str(ROOT / "tests/partitioner")]

H200 = ROOT / "configs/clusters/h200-sxm-node.yaml"
CPU = ROOT / "configs/clusters/cpu-2core.yaml"
RUN26 = ROOT / "benchmarks/results/llm_generate_run26_capped.json"


def timed(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def plan_record(plan) -> dict:
    from hetero.partitioner.phases import Phase

    return {
        "decode_ms": repr(plan.predicted_decode_ms),
        "ttft_ms": repr(plan.predicted_ttft_ms),
        **{ph.value: [c.chosen for c in plan.choice(ph)] for ph in (Phase.DECODE, Phase.PREFILL)},
    }


def llm_rows(repeat: int, big: bool) -> list[dict]:
    from test_generation_plan import _llama, capped

    from hetero.backends.registry import default_registry
    from hetero.cluster.spec import ClusterSpec
    from hetero.partitioner.algorithms.generation import plan_generation

    registry = default_registry()
    lm = _llama()
    cases = [(f"llama8 cap {f}", lm, capped(f, lm), None) for f in (0.5, 0.6, 0.7)]
    cases.append(("llama8 cpu-2core", lm, ClusterSpec.from_yaml(CPU), None))
    lm16 = _llama_batch(16)
    cases.append(("llama8 batch 16 cap 0.7", lm16, capped(0.7, lm16), None))
    if big:
        cases.append(("7B capped 4 GiB (run 26)", *_capped_7b()))
    plan_generation(lm, cases[0][2], registry=registry)  # warm: imports, the registry's loads
    rows = []
    for name, graphs, spec, cm in cases:
        seconds, plan = timed(
            lambda g=graphs, s=spec, c=cm: plan_generation(g, s, registry=registry, cost_model=c),
            repeat,
        )
        rows.append({"case": name, "seconds": seconds, **plan_record(plan)})
        print(f"{name}: {seconds:.3f} s", flush=True)
    return rows


def _llama_batch(batch: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hetero.partitioner.phases import capture_lm

    cfg = LlamaConfig(
        hidden_size=256, intermediate_size=1024, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    )  # fmt: skip
    torch.manual_seed(0)
    return capture_lm(LlamaForCausalLM(cfg).eval(), batch=batch, max_len=64)


def _capped_7b():
    """plan_capped_cpu.py's model, cluster and recorded rates (its `--cpu-shared-gbps` with
    no value: the recorded row alone)."""
    import llm_generate_gpu as gen
    import torch

    from hetero.calibration.split import SplitRates, split_profile
    from hetero.partitioner.cost import CostModel
    from hetero.partitioner.phases import capture_lm

    run = json.loads(RUN26.read_text())["capped"]
    rates = tuple(SplitRates(**r) for r in run["split_rates"])
    lm = capture_lm(
        gen.build(gen.config(False), "meta", torch.float16), batch=1, max_len=256, example_len=128
    )
    spec = gen.cluster(4.0)
    return lm, spec, CostModel(split_profile(spec, spec.device("node0/gpu"), rates))


def random_decode(seed: int, n: int):
    """A decode step's shape with random prices: an embedding, n layers that each read the
    one before and the embedding's tables (one packet per pair of stages), a head; a GPU
    (resident / streamed / split) with a capped memory and its host CPU."""
    from hetero.partitioner.algorithms.problem import RESIDENT, SPLIT, STREAMED, Placement, Problem

    rng = np.random.default_rng(seed)
    g = n + 2
    gpu = rng.uniform(0.05, 0.5, g)
    own = np.stack([gpu, gpu, rng.uniform(1, 6, g), rng.uniform(2, 9, g)], axis=1)
    params = np.r_[100.0, np.full(n, 50.0), 100.0].round()
    copy = np.zeros((g, 4))
    copy[:, 1] = params * rng.uniform(0.05, 0.2)
    copy[:, 2] = copy[:, 1] * rng.uniform(0.2, 0.6, g)
    compute = np.maximum(own, copy)
    compute[0, 1:3] = np.inf  # the embedding is not streamed
    edges = [(i, i + 1) for i in range(g - 1)] + [(0, i) for i in range(2, g - 1)]
    return Problem(
        names=("embed", *(f"layers.{i}" for i in range(n)), "head"),
        devices=("gpu", "cpu"),
        placements=tuple(
            Placement(*p) for p in ((0, RESIDENT), (0, STREAMED), (0, SPLIT), (1, RESIDENT))
        ),
        compute=compute,
        edges=np.array(edges, dtype=int),
        edge_bytes=rng.integers(1, 64, len(edges)).astype(float),
        link_latency=np.array([[0.0, 0.3], [0.3, 0.0]]),
        link_inv_bw=np.array([[0.0, 0.001], [0.001, 0.0]]),
        param_bytes=params,
        act_bytes=np.full(g, 4.0),
        capacity=np.array([params.sum() * rng.uniform(0.3, 0.8), 1e12]),
        in_bytes=np.r_[1.0, np.zeros(g - 1)],
        out_bytes=np.r_[np.zeros(g - 1), 1.0],
        state_bytes=np.r_[0.0, np.full(n, 8.0), 0.0],
        split_bytes=(params * 0.4).round(),
        copy_s=copy,
        own_s=own,
    )


def problem_rows(repeat: int) -> list[dict]:
    from test_algorithms import hopped_problem, random_problem

    from hetero.partitioner.algorithms import latency

    cases = []
    for seed in range(12):
        n, d = 6 + seed % 7, 2 + seed % 3
        cases.append((f"random {seed} n={n} d={d}", random_problem(seed, n, d, chain=seed % 2 == 0, memory=seed % 3 != 0)))  # fmt: skip
    for seed in range(4):
        cases.append((f"hopped {seed}", hopped_problem(seed, 9, 3, chain=False, memory=True)))
    for seed in range(8):
        n = (8, 16, 32)[seed % 3]
        cases.append((f"decode {seed} n={n}", random_decode(seed, n)))
    rows = []
    for name, problem in cases:
        seconds, sol = timed(lambda p=problem: latency(p), repeat)
        rows.append(
            {
                "case": name,
                "seconds": seconds,
                "assign": sol.assign.tolist(),
                "s": repr(sol.seconds),
            }
        )
        print(f"{name}: {seconds:.3f} s", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--7b", dest="big", action="store_true", help="the capped 7B too")
    ap.add_argument("--json", help="write the rows here")
    ap.add_argument("--check", help="an earlier --json: list rows that chose otherwise")
    args = ap.parse_args()
    rows = llm_rows(args.repeat, args.big) + problem_rows(args.repeat)
    before = {r["case"]: r for r in json.loads(Path(args.check).read_text())} if args.check else {}
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| case | seconds | before | speed-up | same choice |")
    print("| --- | ---: | ---: | ---: | --- |")
    for r in rows:
        b = before.get(r["case"])
        same = "-" if b is None else str(all(r[k] == b[k] for k in r if k != "seconds"))
        was = f"{b['seconds']:.3f} | {b['seconds'] / r['seconds']:.1f}x" if b else "- | -"
        print(f"| {r['case']} | {r['seconds']:.3f} | {was} | {same} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
