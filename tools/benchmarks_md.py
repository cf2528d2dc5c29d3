"""Assemble BENCHMARKS.md from benchmarks/results/*.md (each holds its command, machine and date)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORDER = [
    ("llm_generate.md", "GPU: LLaMA-7B generation with a KV cache on a capped H200 (issue 14)"),
    ("gpt2_e2e.md", "GPU: GPT-2 through hetero.compile (issue 8, single GPU)"),
    ("triton.md", "GPU: the Triton backend, kernel by kernel (issue 5)"),
    ("triton_rules.md", "Triton rules for modern models, interpreter-tested (issue 15 item 2)"),
    ("llama_offload.md", "GPU: memory-capped LLaMA 1.1B, weight streaming (issue 8)"),
    ("tvm.md", "CPU: TVM partitions vs eager, ONNX Runtime, torch.compile (issue 4)"),
    (
        "backend_suite.md",
        "GPU: issue 15's suite, hetero's measured backend vs torch.compile (issue 15)",
    ),
    ("compile_times.md", "CPU: compile time against torch.compile; a second compile (issue 15)"),
    ("unnamed_models.md", "CPU: models hetero was never tuned on (a new user's trial)"),
    ("cpu_choice.md", "CPU: the backend chosen by measurement; a 7B decode layer (issue 15)"),
    ("partitioner.md", "Planning time, cost-model accuracy, calibration (issue 3)"),
    ("plan_generation_speed.md", "The generation planner's search: 6-18x faster, same plans"),
    ("plan_scale.md", "Planning at cluster scale: LLaMA-70B over 1-16 nodes (issue 20)"),
    ("runtime.md", "Ray runtime: per-hop overhead (issue 6)"),
    ("pipeline_2gpu.md", "Two GPUs: GPT-2 XL pipeline over NCCL (issue 9)"),
    ("reliability.md", "Reliability: soak with a worker killed and a device removed (issue 18)"),
    ("health_during_compile.md", "Health probes while `hetero serve` compiles (issue 18)"),
    ("safe_gather.md", "The cost of TVM's memory-safe gathers (issue 18)"),
    ("cost_feedback.md", "The cost model after feedback: accuracy and plan choice (issue 16)"),
    ("cost_feedback_gpu.md", "The cost model after feedback on an H200: the GPU cases (issue 16)"),
    ("crossing_values.md", "What a value crossing between partitions costs (issue 16)"),
    (
        "ray_pricing.md",
        "Generation over Ray, priced for Ray: one hop per partition pair (issue 16)",
    ),
    ("serving.md", "Serving: the Open Inference Protocol and Generate (issue 19)"),
]

HEAD = """# Benchmarks

Every table below was produced by a script in `benchmarks/` (one script per question;
each prints its table and writes JSON next to it in `benchmarks/results/`). Each section
names its command, machine, card and date. CPU numbers come from the 2-core development
machine, which was shared with other jobs while they ran (each section says how loaded);
GPU numbers from NVIDIA H100 80GB HBM3 machines (issues 5-9) and an NVIDIA H200 (issue 14)
lent through the device tool (one GPU, or two for issue 9), with the eager and torch.compile
baselines always measured in the same process and run.

Regenerate this file from the sections: `python tools/benchmarks_md.py`.

## The GPU machine: how each GPU benchmark runs there

The device tool's machines have torch, triton and transformers but not ray, TVM or
hetero's small dependencies, and no network. From the repository root here:

```
bash ../shared/device/pack.sh ray tvm-runtime        # .devdeps/: ray and TVM's runtime
python3 -m pip download -d .whl --only-binary=:all: --python-version 3.12 --no-deps \
    --platform manylinux_2_17_x86_64 --implementation cp pydantic==2.14.4 \
    pydantic-core==2.50.5 annotated-types typing-inspection typing-extensions platformdirs \
    pint==0.25.3 flexcache flexparser
python3 -m pip download -d .whl --only-binary=:all: --no-deps --platform manylinux1_x86_64 \
    py-spy==0.4.3                                    # stacks of a run that stops answering
```

then one `run` call per line below, carrying `[".whl", ".devdeps"]` (the kind in brackets).
Every command starts with the same prefix, which installs the wheels and makes the folders
importable as the one package `hetero` (the package-dir mapping of pyproject.toml):

```
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 && \
source .devdeps/bootstrap.sh && \
python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && R=$PWD && \
mkdir -p /tmp/shim/hetero && cp -r hetero/* /tmp/shim/hetero/ && \
for d in partitioner backends runtime cluster interfaces calibration; do ln -sfn $R/$d /tmp/shim/hetero/$d; done && \
export PYTHONPATH=/tmp/shim:/tmp/site PYTHONPYCACHEPREFIX=/tmp/pycache && \
SP=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))") && \
python3 -m compileall -q -j 16 -x '/tests?/' $SP/torch $SP/triton $SP/transformers $SP/sympy \
    $SP/safetensors $SP/numpy $SP/jinja2 $SP/networkx /tmp/site /tmp/shim && cd /tmp && ...
```

(The bytecode, since run 52: the machines set `PYTHONDONTWRITEBYTECODE=1` and their torch
ships none, so every process compiled torch's modules from source, and the prefix alone
never filled. compileall writes it into the prefix in 6 s; importing what a warming imports
then took 4.7 s instead of 11.5. hetero starts several processes (warmings, standbys), the
suite's torch.compile rows none; a user's installation has the bytecode.)

A long run can leave its stacks if it stops answering: start it in the background with its
output in `$OUT/run.log`, then `PATH=/tmp/site/bin:$PATH $R/tools/stall_dump.sh $! $OUT/run.log
60 $OUT/stacks.txt` dumps every thread (Python and native frames, read from outside the
process by py-spy) whenever the log has been quiet for 60 s, until the run ends.

| question | `...` (from /tmp) | kind | wall |
| --- | --- | --- | ---: |
| GPT-2 small/medium through hetero.compile vs eager, torch.compile | `python3 $R/benchmarks/gpt2_e2e_gpu.py --json $OUT/gpt2_e2e.json` | nvidia-h100-x1 | - |
| the Triton backend kernel by kernel | `python3 $R/benchmarks/gpt2_gpu.py --profile --json $OUT/gpt2.json` | nvidia-h100-x1 | - |
| LLaMA 1.1B under a 0.55 GB cap (calibrates first) | `python3 $R/benchmarks/llama_offload.py --budget-s 300 --json $OUT/llama.json` | nvidia-h100-x1 | ~6 min (run 8: 5.4) |
| GPU<->CPU hops vs pinned copies and the bare graph | `python3 $R/benchmarks/hop_overhead_gpu.py --json $OUT/hop_gpu.json` | nvidia-h100-x1 | - |
| two GPUs: pipeline, split sweep, NCCL hops | `python3 $R/benchmarks/pipeline_2gpu.py --json $OUT/p2.json` | nvidia-h100-x2 | ~5 min |
| the GPU tests | `python3 -m pytest -q $R/tests/gpu -p no:cacheprovider` | nvidia-h200 | ~4 min (run 19: 56 passed in 4:09; run 25, an H100: 57 passed in 3:15; run 29, an H100, 2026-12-06: 57 passed in 3:23, `gpu_tests_run29.log`) |
| LLaMA-7B generation, GPU capped at 4 GiB (issue 14; no `.devdeps` needed) | `python3 $R/benchmarks/llm_generate_gpu.py --case capped --json $OUT/capped.json` (with up to three feedback rounds: `--no-feedback` keeps the first plan; `--copy-inputs-too` also times the same stages copying CPU outputs to the GPU, `--launched-streamed-too` with streamed layers launched kernel by kernel instead of replayed as CUDA graphs (the default since run 40); `--sweep` also times every decoder layer forced split, CPU and streamed layers in turn, the CPU for the rest and all streamed, against the chosen plan: issue 16's sweep, 25-40 s a plan on an H100 host (run 36); `--trace` traces the chosen and each forced plan; `--shape qwen2-7b` or `mistral-7b` for a 7B the issue never named) | nvidia-h200 | ~4.5 min with the baselines (run 22: hetero alone took 262 s, so `--budget-s 250` skipped accelerate and the CPU; give it 300); run 18: 3.7 with `--trace`; run 31 (2026-12-06): 244 s of hetero within 310 s; run 33, a host whose CPU reads 66 GB/s: export 41 s and three feedback rounds (165 s) did not finish in 283 s, so give such a host 400 s or `--no-feedback`; run 36 with `--sweep --budget-s 310`: 364 s, three of four forced plans |
| a split layer's time, piece by piece (copies, CPU products, profiled decode) | `python3 $R/benchmarks/split_layer_gpu.py --json $OUT/split.json --trace $OUT/split_trace.json` | nvidia-h200 | ~2.5 min |
| split rows on the overlapped task thread against their calibrated rate, per OpenMP setting (runs 37-38) | `python3 $R/benchmarks/split_in_step_gpu.py --json $OUT/split_in_step.json` | nvidia-h100-x1 | ~75 s for six variants |
| a generation's GPU memory against its plan's, per forced decode layout of an 8-layer 7B-wide model, by allocating site (run 42) | `python3 $R/benchmarks/plan_memory_gpu.py --json $OUT/plan_memory.json` | nvidia-h100-x1 | ~100 s for three layouts |
| the same model uncapped: hetero vs eager and every torch.compile mode | `python3 $R/benchmarks/llm_generate_gpu.py --case uncapped --json $OUT/uncapped.json` | nvidia-h200 | ~4.5 min with two modes (run 19); max-autotune-no-cudagraphs needs a call of its own |
| batch 16 under the cap: chosen plan vs forced streaming / CPU | `python3 $R/benchmarks/llm_generate_gpu.py --case batch16 --json $OUT/b16.json` | nvidia-h200 | ~7 min with `--budget-s 375` (run 24: the chosen plan and both forced ones in 376 s, 425 s of wall time); `--budget-s 300` leaves out the last forced plan |
| Triton rules for modern models (3 runs: see triton_rules.md) | `python3 -m pytest -s -q $R/tests/gpu/test_triton_rules_gpu.py -k "<K>" -p no:cacheprovider` | nvidia-h200 | not run yet |
| issue 15's suite: hetero vs eager and each torch.compile mode, 7 models (several calls: `--models`, `--modes`) | `python3 $R/benchmarks/backend_suite_gpu.py --models gpt2,bert --modes default reduce-overhead --budget-s 450 --json $OUT/suite1.json` (carry and source `.devdeps`) | nvidia-h200 | 3.4 min (two models); 7 min (three) |
| a suite row slower than its measured choice: the model measured and with each GPU backend pinned, timed as a row, with Dynamo's counters and a profile | `python3 $R/benchmarks/choice_vs_row_gpu.py --model mixtral --ways measured,inductor --json $OUT/choice_vs_row.json` (carry and source `.devdeps`) | nvidia-h100-x1 | 78 s for two ways (run 50) |
| issue 16's accuracy benchmark: 10 GPU cases and the GPU backend sweep, one feedback round (`--device cpu` rehearses it here under TRITON_INTERPRET=1) | `timeout -s INT -k 10 245 python3 $R/benchmarks/cost_feedback.py --gpu --quick-calibration --quantile 0.5 --budget-s 180 --json $OUT/cost_feedback_gpu.json --md $OUT/cost_feedback_gpu.md 2>&1 | tee $OUT/cost_feedback_gpu.log` (no `.devdeps`: leave `source .devdeps/bootstrap.sh &&` out of the prefix) | nvidia-h200 | ~3 min (run 19: 4 of 10 cases in a 175 s budget with its 92 s calibration; run 32, 2026-12-06: every case started in 175 s with `--profile $R/benchmarks/results/cost_feedback_gpu.profile.json`, which skips the calibration) |
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
