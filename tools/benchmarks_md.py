"""Assemble BENCHMARKS.md from benchmarks/results/*.md (each holds its command, machine and date)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    ("gpt2_e2e.md", "GPU: GPT-2 through hetero.compile (issue 8, single GPU)"),
    ("triton.md", "GPU: the Triton backend, kernel by kernel (issue 5)"),
    ("llama_offload.md", "GPU: memory-capped LLaMA 1.1B, weight streaming (issue 8)"),
    ("tvm.md", "CPU: TVM partitions vs eager, ONNX Runtime, torch.compile (issue 4)"),
    ("partitioner.md", "Planning time, cost-model accuracy, calibration (issue 3)"),
    ("runtime.md", "Ray runtime: per-hop overhead (issue 6)"),
]

HEAD = """# Benchmarks

Every table below was produced by a script in `benchmarks/` (one script per question;
each prints its table and writes JSON next to it in `benchmarks/results/`). Each section
names its command, machine, card and date. CPU numbers come from the 2-core development
machine, which was shared with other jobs while they ran (each section says how loaded);
GPU numbers from one NVIDIA H100 80GB HBM3 lent through the device tool, with the eager
and torch.compile baselines always measured in the same process and run.

Regenerate this file from the sections: `python tools/benchmarks_md.py`.
"""


def _demote(text: str) -> str:
    """Push each heading one level down (not the comment lines inside code fences)."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def main() -> None:
    parts = [HEAD, "## Contents\n"]
    present = [(f, t) for f, t in ORDER if (ROOT / "benchmarks" / "results" / f).exists()]
    parts += [f"- {t} — `benchmarks/results/{f}`" for f, t in present]
    for f, _ in present:
        text = (ROOT / "benchmarks" / "results" / f).read_text().strip()
        # demote each section's headings one level under this file's title
        parts.append("\n---\n\n" + _demote(text))
    (ROOT / "BENCHMARKS.md").write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    main()
