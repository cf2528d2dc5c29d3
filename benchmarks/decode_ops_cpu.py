"""A small LM's CPU decode, hetero against transformers: ATen ops dispatched per decoded
token, and time to first token and per token as `hetero bench` measures them.

    OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=0 .venv/bin/python benchmarks/decode_ops_cpu.py \
        [--runs 20] [--json benchmarks/results/decode_ops_cpu.json]

The model is what a new user brought to `hetero bench` (a Qwen2 of their own: 4 layers, 128
wide, grouped KV heads, vocab 2048, random weights, float32), generating 32 tokens after a
20-token prompt on configs/clusters/cpu-2core.yaml (`task: generate`). Ops per token: the
ops a `TorchDispatchMode` sees over 16 generated tokens minus those over 8, divided by 8
(prefill and the loop's setup cancel out). Times: `bench_generation`, the `hetero bench`
command's own measurement (streamed tokens' arrivals, interleaved with transformers' eager
`generate` under inference mode). The config asks for feedback, so its CPU decode program
is timed against Inductor's before serving and the faster kept
(runtime/measured_choice.py). The op count comes from a model compiled without feedback:
the op-by-op program's.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
PROMPT = 20


def qwen(prompt: int = PROMPT):
    """The user's model and prompt (the config's factory)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=2048, max_position_embeddings=512,
        initializer_range=0.1,
    )  # fmt: skip
    torch.manual_seed(0)
    return Qwen2ForCausalLM(cfg).eval(), (torch.randint(0, 2048, (1, prompt)),)


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def ops_per_token(generate) -> collections.Counter[str]:
    counts = []
    for n in (8, 16):
        with _Count() as c:
            generate(n)
        counts.append(c.ops)
    return collections.Counter(
        {k: (counts[1][k] - counts[0][k]) / 8 for k in counts[0] | counts[1]}
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()

    import hetero
    from hetero.interfaces.commands.bench_generate import bench_generation
    from hetero.interfaces.config import load_config

    sys.path.insert(0, str(ROOT))  # `benchmarks.decode_ops_cpu:qwen` for the config
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "qwen.yaml"
        path.write_text(
            "model: benchmarks.decode_ops_cpu:qwen\ntask: generate\n"
            "generation: {max_length: 128, max_new_tokens: 32}\nfeedback: true\n"
            f"cluster: {ROOT / 'configs/clusters/cpu-2core.yaml'}\nname: user-qwen2\n"
        )
        timed = bench_generation(load_config(path), runs=args.runs)

    model, (ids,) = qwen()
    lm = hetero.compile(
        model, task="generate", cluster=ROOT / "configs/clusters/cpu-2core.yaml", max_length=128
    )
    try:
        ours = ops_per_token(lambda n: lm.generate(ids, n))
    finally:
        lm.shutdown()

    def theirs_generate(n: int) -> None:
        with torch.inference_mode():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                           pad_token_id=0)  # fmt: skip

    theirs = ops_per_token(theirs_generate)
    out = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "ops_per_token": {"hetero": sum(ours.values()), "transformers": sum(theirs.values())},
        "hetero_ops": dict(ours.most_common(12)),
        "transformers_ops": dict(theirs.most_common(12)),
        "bench": timed,
    }
    h, t = timed["hetero"], timed["transformers_eager"]
    print(f"ATen ops per decoded token: hetero {sum(ours.values()):.0f}, "
          f"transformers {sum(theirs.values()):.0f}")  # fmt: skip
    print(f"per token p50: hetero {h['ms_per_token']['p50']:.2f} ms, transformers "
          f"{t['ms_per_token']['p50']:.2f} ms; first token p50: hetero "
          f"{h['ttft_ms']['p50']:.2f}, transformers {t['ttft_ms']['p50']:.2f}; "
          f"tokens match: {timed['tokens_match']}")  # fmt: skip
    for stage, got in timed["measured_programs"].items():
        times = ", ".join(f"{k} {v:.3f}" for k, v in got["median_ms"].items())
        print(f"{stage}: {got['chosen']} kept ({times} ms)")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))


if __name__ == "__main__":
    main()
