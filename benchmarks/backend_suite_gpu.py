"""Issue 15's backend suite on one GPU: hetero against eager and every torch.compile mode.

    python benchmarks/backend_suite_gpu.py --json $OUT/suite.json
    python benchmarks/backend_suite_gpu.py --models gpt2,bert --modes default reduce-overhead
    python benchmarks/backend_suite_gpu.py --tiny --json /tmp/suite_tiny.json   # CPU smoke test

Models (random weights, float16 on CUDA, built from transformers config objects and
torchvision.models; nothing is downloaded):
  gpt2            GPT-2 small (GPT2Model), 8x512
  bert            BERT-base (BertModel), 8x512
  llama-prefill   the TinyLlama-1.1B shape (LlamaModel: hidden 2048, intermediate 5632, 22
                  layers, 32 heads, 4 KV heads, vocab 32000), 4x256
  llama-decode    the same model's one-token decode step on a static KV cache, batch 4 after a
                  256-token prompt: ms per generated token (below)
  mixtral         a small Mixtral (MixtralModel: hidden 1024, intermediate 3584, 4 layers, 16
                  heads, 8 KV heads, 8 experts, top-2, vocab 32000), 4x256
  convnext-t      torchvision convnext_tiny, 32x3x224x224
  mobilenet-v3-l  torchvision mobilenet_v3_large, 32x3x224x224

Each row: eager; hetero (hetero.compile on this machine's cluster, configs/clusters/
h200-sxm-node.yaml, in-process executor; its measured backend choice per partition,
runtime/choice.py, among the GPU backends that import here: triton, inductor,
inductor-cudagraphs, cudagraphs, eager; TVM is left out, the GPU machine has none); then
torch.compile in each of --modes, max-autotune-no-cudagraphs last since it may take minutes.
The base models (no LM or classifier head on the language models) are timed,
as gpt2_e2e_gpu.py does. Times are medians of CUDA-event-timed loops (gpt2_gpu.timed); error
is ||out - eager|| / ||eager|| of the main output (last_hidden_state, or the logits); compile
time is hetero.compile's wall time, and for torch.compile the first call's.

llama-decode follows llm_generate_gpu.py's uncapped case (its functions, imported):
transformers' generate (eager), hetero.compile(task="generate") (its decode plan's backend
per partition), torch.compile of transformers' model on the same kind of static cache
(StaticCacheLM, the module hetero captures); each ms per token after the first. Error, for
hetero and each mode alike: the largest relative error of a step's logits against
generate's, teacher-forced on generate's tokens (prefill, then 7 decode steps).

Each way compiles into fresh, empty Inductor and Triton caches of its own
(`torch._inductor.utils.fresh_cache`, which also clears Inductor's in-memory caches), so
that whichever way runs second does not reuse the first's kernels and every compile time is
a first compile's. The caches stay on, as they are for a user: a compile may use what it
writes itself (hetero's Inductor candidates are compiled in another process while the
Triton candidate compiles, and read back from that cache). Before 2026-12-06 the caches
were off for every way instead.

Goals (issue 15, same run, same card): hetero <= 1.0x the best torch.compile mode on every
model and geometric mean <= 0.9x; error no worse than torch.compile's; compile time <= 2x
torch.compile's.

On the GPU machine (600 s a call) the suite takes several calls; estimates, not yet run:
gpt2,bert with default and reduce-overhead ~6 min; llama-prefill ~6; llama-decode ~6 (the
7B's hetero generation compile took 255 s); mixtral,mobilenet-v3-l ~6; convnext-t ~3; and
max-autotune-no-cudagraphs a model or two a call with --skip-hetero (the 7B's was still
autotuning after 178 s). --choice-budget-s bounds hetero's measured choice.

--tiny shrinks every model so that the whole suite runs on a CPU in a minute or two (float32,
without the CUDA-only modes); torchvision rows are "not run" where torchvision does not
import. --json is rewritten after every measurement, so a call killed at its time limit
keeps what finished.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import importlib
import json
import logging
import math
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
# The sibling scripts by their own names (as split_layer_gpu.py imports them): the repository
# root on sys.path would put its bare `hetero/` folder ahead of the installed package.
sys.path.insert(0, str(ROOT / "benchmarks"))
import llm_generate_gpu  # noqa: E402
from gpt2_gpu import hidden, rel_err  # noqa: E402
from gpt2_gpu import timed as cuda_timed  # noqa: E402

CLUSTER = ROOT / "configs" / "clusters" / "h200-sxm-node.yaml"
MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs")
CUDA_ONLY_MODES = frozenset({"reduce-overhead"})  # CUDA graphs
NOT_RUN_TIME = "not run (time)"
T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", flush=True)


# ---- models ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Case:
    name: str
    shape: str  # as issue 15 gives it
    # (tiny, device, dtype) -> (model, inputs); None: the decode row, built by decode_row
    build: Callable[[bool, str, torch.dtype], tuple[torch.nn.Module, tuple]] | None


def on_device(factory: Callable[[], torch.nn.Module], device: str, dtype: torch.dtype):
    """`factory()` made directly on `device` in `dtype`: 1.1 B random values initialised on
    the host take a minute there."""
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return factory().eval()
    finally:
        torch.set_default_dtype(old)


def token_ids(vocab: int, batch: int, seq: int, device: str) -> tuple[torch.Tensor]:
    torch.manual_seed(1)
    return (torch.randint(0, vocab, (batch, seq), device=device),)


def gpt2(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import GPT2Config, GPT2Model

    size = (
        dict(n_layer=2, n_embd=64, n_head=4, vocab_size=512, bos_token_id=0, eos_token_id=0)
        if tiny else {}
    )  # fmt: skip
    cfg = GPT2Config(use_cache=False, **size)
    b, s = (2, 32) if tiny else (8, 512)
    return on_device(lambda: GPT2Model(cfg), device, dtype), token_ids(cfg.vocab_size, b, s, device)


def bert(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import BertConfig, BertModel

    size = (
        dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=128,
             vocab_size=512)
        if tiny else {}
    )  # fmt: skip
    cfg = BertConfig(**size)
    b, s = (2, 32) if tiny else (8, 512)
    return on_device(lambda: BertModel(cfg), device, dtype), token_ids(cfg.vocab_size, b, s, device)


def llama_config(tiny: bool):
    """llm_generate_gpu.py's configs: its tiny one, or the TinyLlama-1.1B shape."""
    cfg = llm_generate_gpu.config(tiny, "7b" if tiny else "1.1b")
    cfg.use_cache = False
    return cfg


def llama_prefill(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import LlamaModel

    cfg = llama_config(tiny)
    b, s = (2, 32) if tiny else (4, 256)
    return on_device(lambda: LlamaModel(cfg), device, dtype), token_ids(
        cfg.vocab_size, b, s, device
    )


def mixtral(tiny: bool, device: str, dtype: torch.dtype):
    from transformers import MixtralConfig, MixtralModel

    size = (
        dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=512)
        if tiny else
        dict(hidden_size=1024, intermediate_size=3584, num_hidden_layers=4, num_attention_heads=16,
             num_key_value_heads=8, vocab_size=32000)
    )  # fmt: skip
    cfg = MixtralConfig(
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, use_cache=False,
        **size,
    )  # fmt: skip
    b, s = (2, 32) if tiny else (4, 256)
    return on_device(lambda: MixtralModel(cfg), device, dtype), token_ids(
        cfg.vocab_size, b, s, device
    )


def settle_batch_norm(model: torch.nn.Module, x: torch.Tensor, passes: int = 3) -> None:
    """Batch-norm statistics from a few forward passes on `x` (float32), then eval mode.
    With random weights and the default statistics (mean 0, variance 1) nothing normalises
    MobileNetV3's activations: its float16 output overflowed to NaN in eager and in every
    torch.compile mode (run 4), so no error could be compared."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a plain average over the passes
    model.train()
    with torch.no_grad():
        for _ in range(passes):
            model(x)
    model.eval()


def vision(name: str):
    def build(tiny: bool, device: str, dtype: torch.dtype):
        models = importlib.import_module("torchvision.models")  # optional: the GPU machine has it
        model = on_device(lambda: getattr(models, name)(weights=None), device, torch.float32)
        torch.manual_seed(1)
        b, hw = (1, 64) if tiny else (32, 224)
        x = torch.randn(b, 3, hw, hw, device=device)
        settle_batch_norm(model, x)
        return model.to(dtype), (x.to(dtype),)

    return build


CASES = {
    c.name: c
    for c in (
        Case("gpt2", "8x512", gpt2),
        Case("bert", "8x512", bert),
        Case("llama-prefill", "4x256", llama_prefill),
        Case("llama-decode", "4x(256+1)", None),
        Case("mixtral", "4x256", mixtral),
        Case("convnext-t", "32x3x224x224", vision("convnext_tiny")),
        Case("mobilenet-v3-l", "32x3x224x224", vision("mobilenet_v3_large")),
    )
}


# ---- how each way is run -----------------------------------------------------------------------
@dataclass
class Env:
    """What every row shares: the device, the budget, the JSON being written."""

    device: str
    dtype: torch.dtype
    tiny: bool
    modes: tuple[str, ...]
    budget_s: float
    choice_budget_s: float | None  # hetero's measured backend choice (None: its default)
    hetero: bool  # False: only eager and torch.compile (a call for the slow modes alone)
    json_path: str | None
    results: dict
    cold: bool = True  # each way in fresh caches (`cold_caches`)
    # configs the Triton candidate tunes per kernel, and threads compiling them (None: its default)
    tune_trials: int | None = None
    tune_threads: int | None = None

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    def out_of_time(self) -> bool:
        return time.perf_counter() - T0 > self.budget_s

    def save(self) -> None:
        if self.json_path:
            Path(self.json_path).write_text(json.dumps(self.results, indent=1, default=str))

    def time_ms(self, fn, args: tuple) -> float:
        """ms per call: on a GPU the median of CUDA-event-timed loops (gpt2_gpu.timed); on a
        CPU the fastest of short rounds (calibration.timing.time_call, as hetero's backend
        choice times), since the 2-core box's other jobs make a median mostly their time."""
        if self.cuda:
            return cuda_timed(fn, args)
        from hetero.calibration.timing import time_call

        return 1e3 * time_call(lambda: fn(*args), budget=0.2)


def failure(e: BaseException) -> dict:
    return {
        "error": f"{type(e).__name__}: {str(e)[:400]}",
        "traceback": traceback.format_exc()[-3000:],
    }


def registry_without_tvm():
    """The built-in backends less TVM: the GPU machine has none, and on a CPU box its
    compile (~30 s a partition) would be most of the smoke test."""
    from hetero.backends.registry import BUILTIN, BackendRegistry

    def factory(path: str):
        module, cls = path.split(":")
        return lambda: getattr(importlib.import_module(module), cls)()

    reg = BackendRegistry()
    for name, path in BUILTIN.items():
        if name != "tvm":
            reg.register(name, factory(path))
    return reg


def cluster(env: Env):
    import hetero

    if env.cuda:
        return hetero.Cluster.from_yaml(CLUSTER)
    return hetero.Cluster.local(include_gpus=False)


def assignment():
    """The defaults (GPU: triton) with the host CPU on eager (no TVM), and no kind pinned:
    hetero measures every backend of each partition's device and keeps the fastest."""
    from hetero.partitioner.decisions import BackendAssignment

    return BackendAssignment(by_kind=(("cpu", "eager"), ("gpu", "triton"), ("npu", "eager")))


def run_hetero(env: Env, model, inputs, ref, exact: torch.Tensor | None = None) -> dict:
    import hetero
    from hetero.backends.base import CompileOptions
    from hetero.partitioner.decisions import BackendChoice

    cache = tempfile.mkdtemp(prefix="hetero-suite-")  # fresh: nothing measured before is reused
    choose = None if env.choice_budget_s is None else BackendChoice(budget_s=env.choice_budget_s)
    stats = torch._dynamo.utils.counters["inductor"]
    before = {k: stats[k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
    t = time.perf_counter()
    options = None
    if env.tune_trials is not None or env.tune_threads is not None:  # the Triton candidate's
        extra = () if env.tune_threads is None else (("compile_threads", env.tune_threads),)
        options = {"triton": CompileOptions(tune_trials=env.tune_trials or 0, extra=extra)}
    cm = hetero.compile(
        model, inputs, cluster=cluster(env), backends=assignment(), cache_dir=cache,
        executor="local", registry=registry_without_tvm(), choose=choose, options=options,
    )  # fmt: skip
    out = {"compile_s": time.perf_counter() - t, "compile_times": cm.compile_times.to_dict()}
    # hits: Inductor's compiles found in the cache a warming process wrote (backends/warming.py)
    out["inductor_cache"] = {k: stats[k] - v for k, v in before.items()}
    try:
        with torch.no_grad():
            first = hidden(cm(*inputs)).clone()
            out["err"] = rel_err(first, ref)
            if exact is not None:  # `float32_reference`
                out["err_fp32"] = rel_err(first, exact)
            out["ms"] = env.time_ms(cm, inputs)
        plan = cm.plan
        out["predicted_ms"] = plan.predicted_ms
        out["partitions"] = [partition_row(p) for p in plan.partitions]
        out["explain"] = plan.explain(width=160)
    finally:
        cm.shutdown()
    return out


def partition_row(p) -> dict:
    """One partition: where it runs, the backend hetero chose and every candidate's time
    (None: not measured, `note` says why)."""
    return {
        "partition": p.index,
        "device": p.device,
        "backend": p.backend,
        "ops": len(p.nodes),
        "predicted_ms": p.predicted_ms,
        "candidates": [{"backend": t.backend, "ms": t.ms, "note": t.note} for t in p.choice],
    }


def run_compile(env: Env, model, inputs, ref, mode: str, exact: torch.Tensor | None = None) -> dict:
    torch._dynamo.reset()
    fn = torch.compile(model, mode=None if mode == "default" else mode)
    with torch.no_grad():
        t = time.perf_counter()
        # reduce-overhead hands out its CUDA graph's buffers: read them before the next call
        first = hidden(fn(*inputs)).clone()
        llm_generate_gpu.sync()
        out = {"compile_s": time.perf_counter() - t, "err": rel_err(first, ref)}
        if exact is not None:  # `float32_reference`
            out["err_fp32"] = rel_err(first, exact)
        out["ms"] = env.time_ms(fn, inputs)
    torch._dynamo.reset()
    return out


def float32_reference(model, inputs) -> torch.Tensor | None:
    """The model's output computed in float32 from the same 16-bit weights (a copy: the
    model stays as it is), or None for a float32 model. Each way's error against it says
    how far it is from exact, where its error against the 16-bit eager run also counts
    eager's own rounding: a mixture of experts whose near-tied routing flips on that
    rounding measured every compiled way ~2% off eager (BENCHMARKS.md, run 32)."""
    if not any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        return None
    wide = copy.deepcopy(model).float()
    args = [a.float() if a.is_floating_point() else a for a in inputs]
    with torch.no_grad():
        out = hidden(wide(*args)).clone()
    del wide
    return out


def forward_row(env: Env, case: Case, row: dict) -> None:
    model, inputs = case.build(env.tiny, env.device, env.dtype)
    row["shape"] = "x".join(str(d) for d in inputs[0].shape)
    with torch.no_grad():
        ref = hidden(model(*inputs)).clone()
        row["eager_ms"] = env.time_ms(model, inputs)
    exact = float32_reference(model, inputs)
    if exact is not None:
        row["eager_err_fp32"] = rel_err(ref, exact)
    env.save()
    ways = [("hetero", lambda: run_hetero(env, model, inputs, ref, exact))] if env.hetero else []
    ways += [(m, lambda m=m: run_compile(env, model, inputs, ref, m, exact)) for m in env.modes]
    measure_ways(env, row, ways)


def decode_row(env: Env, row: dict) -> None:
    """llm_generate_gpu.py's uncapped case for the 1.1B shape at batch 4: ms per token."""
    g = llm_generate_gpu
    cfg = g.config(env.tiny, "7b" if env.tiny else "1.1b")
    batch, prompt = (2, 16) if env.tiny else (4, 256)
    a = SimpleNamespace(max_len=prompt + 64, new_tokens=8 if env.tiny else 32,
                        repeats=1 if env.tiny else 3)  # fmt: skip
    model = g.build(cfg, env.device, env.dtype)
    torch.manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (batch, prompt), device=env.device)
    row["shape"] = f"{batch}x({prompt}+1)"
    row["eager_ms"] = g.hf_times(model, ids, a.new_tokens, a.repeats)["ms_per_token"]
    env.save()
    tokens, ref = g.reference(model, ids, 4 if env.tiny else 8)

    def hetero_decode() -> dict:
        cache = Path(tempfile.mkdtemp(prefix="hetero-suite-gen-"))
        stats = torch._dynamo.utils.counters["inductor"]
        before = {k: stats[k] for k in ("fxgraph_cache_hit", "fxgraph_cache_miss")}
        # the H200 box's cluster; without CUDA compile_lm runs the GPU's stages on the CPU
        lm, secs = g.compile_lm(
            model, g.cluster(None), a.max_len, batch, cache, prompt_length=prompt
        )
        # hits: compiles a warming process left (runtime/stage_warming.py)
        cached = {k: stats[k] - v for k, v in before.items()}
        try:
            times = g.hetero_times(lm, ids.cpu(), a.new_tokens, a.repeats)
            check = g.teacher_forced(lm, ids.cpu(), tokens, ref)
            return {
                "compile_s": secs,
                "compile_times": lm.compile_times.to_dict(),
                "inductor_cache": cached,
                "ms": times["ms_per_token"],
                "err": check["max_rel_err"],
                "argmax_agreement": check["argmax_agreement"],
                "predicted_ms": lm.plan.predicted_decode_ms,
                "partitions": [partition_row(p) for p in lm.plan.decode.partitions],
                "explain": lm.explain(width=160),
            }
        finally:
            lm.shutdown()

    def compiled(mode: str) -> dict:
        # the same static cache and the same teacher-forced tokens as hetero's check above
        r = g.compiled_times(model, ids, a, mode, check=(tokens, ref))
        torch._dynamo.reset()
        check = r["logits_vs_eager"]
        return {
            "compile_s": r["compile_s"],
            "ms": r["ms_per_token"],
            "err": check["max_rel_err"],
            "argmax_agreement": check["argmax_agreement"],
        }

    ways = [("hetero", hetero_decode)] if env.hetero else []
    ways += [(m, lambda m=m: compiled(m)) for m in env.modes]
    measure_ways(env, row, ways)


def measure_ways(env: Env, row: dict, ways) -> None:
    """Each way in turn, recorded (or its failure) and saved before the next starts."""
    for name, run in ways:
        if env.out_of_time():
            row[name] = NOT_RUN_TIME
            continue
        log(f"  {row['model']}: {name}")
        row[name] = {"unfinished": "started; the process ended before it finished"}
        env.save()
        try:
            with cold_caches(env.cold):
                row[name] = run()
        except Exception as e:  # recorded; the other ways still run
            row[name] = failure(e)
            log(f"  {name} failed: {row[name]['error']}")
        explain = row[name].pop("explain", None) if isinstance(row[name], dict) else None
        if explain:
            print(explain, flush=True)
        shown = {k: v for k, v in row[name].items() if k not in ("partitions", "traceback")}
        log(f"  {name}: {shown}")
        gc.collect()
        if env.cuda:
            torch.cuda.empty_cache()
        env.save()
    summarize_row(env, row)
    env.save()


def summarize_row(env: Env, row: dict) -> None:
    """hetero / the fastest torch.compile mode, and that mode's error and compile time."""
    done = {m: row[m] for m in env.modes if isinstance(row.get(m), dict) and "ms" in row[m]}
    het = row.get("hetero")
    if not done or not isinstance(het, dict) or "ms" not in het:
        return
    best = min(done, key=lambda m: done[m]["ms"])
    row["best_compile"] = best
    row["ratio"] = het["ms"] / done[best]["ms"]
    row["compile_time_ratio"] = het["compile_s"] / done[best]["compile_s"]


def run_row(env: Env, case: Case) -> dict:
    row = {"model": case.name, "issue_shape": case.shape}
    env.results["rows"].append(row)
    if env.out_of_time():
        row["not_run"] = NOT_RUN_TIME
        return row
    log(f"{case.name}")
    try:
        decode_row(env, row) if case.build is None else forward_row(env, case, row)
    except Exception as e:  # the model could not be built or run eagerly: the next model runs
        row["not_run"] = f"not run: {failure(e)['error']}"
        row["traceback"] = failure(e)["traceback"]
        log(f"  {case.name} not run: {row['not_run']}")
    gc.collect()
    if env.cuda:
        torch.cuda.empty_cache()
    env.save()
    return row


# ---- the table -----------------------------------------------------------------------------------
def fmt(v, spec: str = ".3f") -> str:
    return "-" if v is None else format(v, spec)


def cell(way, key: str, spec: str) -> str:
    if isinstance(way, dict):
        if "error" in way:
            return "failed"
        if key in way:
            return fmt(way[key], spec)
        return "-"
    return way if isinstance(way, str) else "-"  # "not run (time)"


def backends_of(way) -> str:
    if not isinstance(way, dict) or "partitions" not in way:
        return "-"
    parts = []
    for p in way["partitions"]:
        tried = ", ".join(f"{c['backend']} {c['ms']:.3f}" for c in p["candidates"] if c["ms"])
        parts.append(
            f"p{p['partition']} {p['device']}: {p['backend']}" + (f" ({tried})" if tried else "")
        )
    return "; ".join(parts)


def markdown(env: Env) -> str:
    modes = env.modes
    head = ["model", "shape", "eager", *modes, "hetero", "hetero/best", "hetero's backends"]
    lines = [
        f"ms per call (decode: per token), {env.results['machine']['card']}, {env.dtype}",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    ratios = []
    for r in env.results["rows"]:
        if "not_run" in r:
            lines.append(
                f"| {r['model']} | {r['issue_shape']} | {r['not_run'][:100]} |"
                + " |" * (len(head) - 3)
            )
            continue
        if "ratio" in r:
            ratios.append(r["ratio"])
        cells = [r["model"], r.get("shape", r["issue_shape"]), fmt(r.get("eager_ms"))]
        cells += [cell(r.get(m), "ms", ".3f") for m in modes]
        cells += [
            cell(r.get("hetero"), "ms", ".3f"),
            fmt(r.get("ratio"), ".2f"),
            backends_of(r.get("hetero")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    geo = math.exp(statistics.fmean(math.log(x) for x in ratios)) if ratios else None
    lines += ["", f"geometric mean of hetero / best torch.compile: {fmt(geo, '.3f')} over {len(ratios)} model(s) "
              "(goal: <= 1.0 on every model, <= 0.9 geometric mean)", ""]  # fmt: skip
    head2 = ["model", *(f"err {m}" for m in modes), "err hetero", *(f"compile s {m}" for m in modes),
             "compile s hetero", "hetero / best compile s"]  # fmt: skip
    lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
    for r in env.results["rows"]:
        if "not_run" in r:
            continue
        cells = [r["model"]]
        cells += [cell(r.get(w), "err", ".1e") for w in (*modes, "hetero")]
        cells += [cell(r.get(w), "compile_s", ".1f") for w in (*modes, "hetero")]
        cells.append(fmt(r.get("compile_time_ratio"), ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    failed = [
        f"- {r['model']} / {w}: {r[w]['error']}"
        for r in env.results["rows"]
        for w in ("hetero", *modes)
        if isinstance(r.get(w), dict) and "error" in r[w]
    ]
    if failed:
        lines += ["", "failed:", *failed]
    return "\n".join(lines)


# ---- main ----------------------------------------------------------------------------------------
def cold_caches(cold: bool):
    """Where `cold`: fresh, empty Inductor and Triton cache folders (on) and Inductor's
    in-memory caches cleared, for one way: it pays a first compile's full cost, whichever way
    compiled the same kernels before it."""
    if not cold:
        return contextlib.nullcontext()
    from torch._inductor.utils import fresh_cache  # torch 2.11 and 2.13 alike

    return fresh_cache()


def warm_up_process(env: Env) -> float:
    """Pay, before any way, what the process's first compile pays whichever way it is: the
    compilers' imports, the CUDA context, Inductor's pool of compile workers, dynamo's
    set-up. Otherwise the first way of the first row (hetero) carries them. Seconds taken."""
    t = time.perf_counter()
    with cold_caches(env.cold):
        x = torch.ones(64, device=env.device, dtype=env.dtype)
        torch.compile(lambda v: torch.relu(v) * 2.0 + v.sum())(x)
    torch._dynamo.reset()
    return round(time.perf_counter() - t, 2)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(CASES),
                    help=f"comma-separated, in this order or any: {', '.join(CASES)}")  # fmt: skip
    ap.add_argument("--modes", nargs="*", default=None,
                    help=f"torch.compile modes (default: {' '.join(MODES)}; --tiny: default)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=520.0,
                    help="start nothing after this many seconds; the rest is 'not run (time)'")  # fmt: skip
    ap.add_argument("--json", help="write the results here (rewritten after every measurement)")
    ap.add_argument("--tiny", action="store_true", help="small models: a smoke test on a CPU")
    ap.add_argument("--warm-caches", action="store_true",
                    help="keep Inductor's and Triton's usual on-disk caches (compile times warm; "
                    "--tiny keeps them)")  # fmt: skip
    ap.add_argument("--choice-budget-s", type=float, default=None,
                    help="seconds hetero's measured backend choice may spend per compile "
                    "(default: hetero's)")  # fmt: skip
    ap.add_argument("--tune-trials", type=int, default=None,
                    help="configs hetero's Triton candidate compiles and times per tuned kernel "
                    "(CompileOptions.tune_trials; default: hetero's, 8 for a matmul)")  # fmt: skip
    ap.add_argument("--tune-threads", type=int, default=None,
                    help="threads compiling the Triton candidate's kernels and configs before they "
                    "are timed (TritonOptions.compile_threads; 1: serial tuning, no precompile)")  # fmt: skip
    ap.add_argument("--skip-hetero", action="store_true",
                    help="eager and torch.compile only (e.g. max-autotune in a call of its own)")  # fmt: skip
    ap.add_argument("--log", choices=("warning", "info", "debug"), default="warning",
                    help="hetero's log level (info: each warming's time or failure, the choice's notes; "
                    "debug: also every Triton autotune config's time per kernel)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.modes is None:  # a smoke test needs one mode; max-autotune's search is the slowest
        args.modes = ["default"] if args.tiny else list(MODES)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; known: {', '.join(CASES)}")
    args.models = names
    bad = [m for m in args.modes if m not in ("default", *torch._inductor.list_mode_options())]
    if bad:
        ap.error(f"unknown torch.compile mode(s) {', '.join(bad)}; known: default, "
                 f"{', '.join(torch._inductor.list_mode_options())}")  # fmt: skip
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    logging.basicConfig(format="[%(asctime)s] %(name)s: %(message)s", level=logging.WARNING)
    logging.getLogger("hetero").setLevel(args.log.upper())
    cuda = torch.cuda.is_available()
    modes = tuple(m for m in args.modes if cuda or m not in CUDA_ONLY_MODES)
    env = Env(
        device="cuda" if cuda else "cpu", dtype=torch.float16 if cuda else torch.float32,
        tiny=args.tiny, modes=modes, budget_s=args.budget_s, choice_budget_s=args.choice_budget_s,
        tune_trials=args.tune_trials, tune_threads=args.tune_threads,
        hetero=not args.skip_hetero, json_path=args.json,
        results={"machine": machine(), "args": vars(args), "modes": list(modes), "rows": []},
        cold=not (args.warm_caches or args.tiny),
    )  # fmt: skip
    skipped = sorted(set(args.modes) - set(modes))
    if skipped:
        env.results["skipped_modes"] = f"{', '.join(skipped)}: needs CUDA"
    env.results["process_warm_up_s"] = warm_up_process(env)
    for name in args.models:
        run_row(env, CASES[name])
    table = markdown(env)
    env.results["table"] = table
    env.save()
    print("\n" + table, flush=True)
    return env.results


def machine() -> dict:
    out = {
        "card": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    for lib in ("transformers", "triton", "torchvision"):
        try:
            out[lib] = importlib.import_module(lib).__version__
        except Exception:  # absent, or (torchvision) built for another torch
            out[lib] = None
    return out


if __name__ == "__main__":
    main()
