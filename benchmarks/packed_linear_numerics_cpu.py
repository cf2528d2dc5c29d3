"""A model no issue names, in bfloat16 on this CPU: which decode program the measured choice
keeps (op by op, Inductor, oneDNN on weights packed once) and the teacher-forced logits of
each decode step before and after it, against transformers in bfloat16 and in float32.

    .venv/bin/python benchmarks/packed_linear_numerics_cpu.py [--json out.json]

Model: Qwen2 (grouped-query attention, biased q/k/v), hidden 1024, 4 layers, random weights;
prompt 12, 8 decode steps fed transformers' own greedy tokens.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    from transformers import Qwen2Config, Qwen2ForCausalLM

    import hetero
    from hetero.interfaces.commands.bench_generate import measured_programs
    from hetero.partitioner.phases import Phase

    torch.manual_seed(0)
    cfg = Qwen2Config(
        hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
        num_key_value_heads=4, vocab_size=8000, max_position_embeddings=256,
    )  # fmt: skip
    model = Qwen2ForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, 12))
    n = 8
    with torch.no_grad():
        seq = model.generate(prompt, max_new_tokens=n + 1, min_new_tokens=n + 1, do_sample=False)
        ref32 = copy.deepcopy(model).float()(seq).logits[0, 12 : 12 + n]
        ref16 = model(seq).logits[0, 12 : 12 + n].float()
    lm = hetero.compile(
        model, task="generate", cluster="configs/clusters/cpu-2core.yaml", max_length=64,
        cache_dir=tempfile.mkdtemp(prefix="hetero-packed-"),
    )  # fmt: skip

    def decode_logits() -> torch.Tensor:
        g = lm.generation
        with torch.inference_mode():
            g.step(Phase.PREFILL, prompt, 0)
            g.move_state()
            rows = [g.step(Phase.DECODE, seq[:, 12 + k].view(1, 1), 12 + k) for k in range(n)]
        return torch.stack([r.reshape(-1, r.shape[-1])[-1].float() for r in rows])

    def err(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((x - ref).norm(dim=-1) / ref.norm(dim=-1)).max())

    lm.generate(prompt, max_new_tokens=4)
    before = decode_logits()  # the first candidate (op by op) serves until settle()
    lm.generation.settle()
    after = decode_logits()
    out = {
        "torch": torch.__version__,
        "choices": measured_programs(lm),
        "max_rel_err": {
            "op_by_op_vs_fp32": err(before, ref32),
            "chosen_vs_fp32": err(after, ref32),
            "chosen_vs_transformers_bf16": err(after, ref16),
            "transformers_bf16_vs_fp32": err(ref16, ref32),
            "chosen_vs_op_by_op_abs": float((after - before).abs().max()),
        },
    }
    lm.shutdown()
    print(json.dumps(out, indent=1))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
