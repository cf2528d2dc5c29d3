"""A 16-bit LM decoding on this CPU: what the decode program's measured choice finds among
op by op, Inductor's CPU code and oneDNN on weights packed once (backends/packed_linear.py),
and hetero's ms per token against transformers' `generate` on the same model and threads.

    .venv/bin/python benchmarks/packed_linear_cpu.py [--layers 2] [--dtype bfloat16] [--json out.json]

Model: LLaMA-7B-wide layers (hidden 4096, intermediate 11008, 32 heads, vocab 32000),
random weights, `--layers` of them; prompt 16, 16 tokens timed after the first. Each
engine runs `--repeats` times, alternated; a figure is the median.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch


def _per_token(gen, prompt, new: int) -> float:
    t = time.perf_counter()
    gen(prompt, 1)
    first = time.perf_counter() - t
    t = time.perf_counter()
    gen(prompt, new + 1)
    return (time.perf_counter() - t - first) / new * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--json", default=None)
    ap.add_argument(
        "--no-huge-pages",
        action="store_true",
        help="leave the CPU's weights in 4 KiB pages (runtime/host_pages.py; hetero re-backs "
        "the weights it binds in place, which are the model's own: transformers then reads "
        "them in huge pages too)",
    )
    a = ap.parse_args()
    if a.no_huge_pages:
        from hetero.runtime import host_pages

        host_pages.available = lambda: False  # what collapse asks
    from transformers import LlamaConfig, LlamaForCausalLM

    import hetero
    from hetero.backends.packed_linear import packable_dtypes
    from hetero.interfaces.commands.bench_generate import measured_programs

    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers,
        num_attention_heads=32, num_key_value_heads=32, vocab_size=32000,
        max_position_embeddings=256,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg).to(dtype).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 16))
    lm = hetero.compile(
        model, task="generate", cluster="configs/clusters/cpu-2core.yaml", max_length=64,
        cache_dir=tempfile.mkdtemp(prefix="hetero-packed-"),
    )  # fmt: skip
    lm.generate(prompt, max_new_tokens=8)
    lm.generation.settle()
    choices = measured_programs(lm)

    def hf(p, n):
        with torch.inference_mode():
            model.generate(p, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    hf(prompt, 2)
    runs: dict[str, list[float]] = {"hetero": [], "transformers": []}
    for _ in range(a.repeats):
        runs["hetero"].append(
            _per_token(lambda p, n: lm.generate(p, max_new_tokens=n), prompt, a.new)
        )
        runs["transformers"].append(_per_token(hf, prompt, a.new))
    lm.shutdown()
    out = {
        "torch": torch.__version__, "threads": torch.get_num_threads(), "dtype": a.dtype,
        "layers": a.layers, "packable": [str(t) for t in packable_dtypes()],
        "huge_pages": not a.no_huge_pages,
        "choices": choices, "ms_per_token": runs,
        "median_ms_per_token": {k: statistics.median(v) for k, v in runs.items()},
    }  # fmt: skip
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
