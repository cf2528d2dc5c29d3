"""Models hetero was never tuned on, on this CPU: does `hetero.compile` take them, do they
match eager, are they as fast as the best of eager and torch.compile, and is every bad
request a hetero error?

Models are built from config objects and torchvision constructors (random weights, nothing
downloaded), float32, small shapes. Each runs in its own process under hetero's thread
settings (hetero/environment.py: OMP_WAIT_POLICY=PASSIVE, GOMP_SPINCOUNT=0; one process
spinning OpenMP threads on a shared box ran eager, torch.compile and hetero 10-100x slower).
Forward rows: max |hetero - eager| (absolute, and relative to the largest eager value) and
ms per call of hetero, eager and torch.compile (default mode), interleaved, the median of
--calls warm calls each. Generate rows (`task="generate"`, cpu-2core, a cache of 64): the
greedy tokens against transformers' `generate(do_sample=False)` for 32 new tokens, and ms
for those 32 tokens (hetero / transformers, median of 5). "bad inputs": the requests hetero
answered with one of its errors out of those tried (wrong dtype, rank, shape, token ids
outside the vocabulary, non-tensor, generate arguments); the others are listed.

    .venv/bin/python benchmarks/unnamed_models_cpu.py                 # every model
    .venv/bin/python benchmarks/unnamed_models_cpu.py resnet18 qwen2 gen:opt

Writes benchmarks/results/unnamed_models_cpu.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
VISION = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "vit_small", "swin_t")
ENCODERS = ("distilbert", "t5enc", "whisper_enc")
LMS = ("qwen2", "opt", "falcon", "gptj", "bloom", "gpt2")
GENERATE = ("qwen2", "opt", "falcon", "bloom", "gpt2")
VOCAB = 1000
THREAD_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "0", "TVM_BIND_THREADS": "0"}


def _torchvision():
    """torchvision.models. PyPI's torchvision wheel is a CUDA build whose C ops do not load
    beside CPU torch; its fake-kernel registrations of those ops then fail at import. They
    are skipped (the models use none of them)."""
    real = torch.library.register_fake

    def fake(op, *a, **k):
        if isinstance(op, str) and op.startswith("torchvision::"):
            return lambda f: f
        return real(op, *a, **k)

    torch.library.register_fake = fake
    try:
        import torchvision.models as models
    finally:
        torch.library.register_fake = real
    return models


def causal_lm(name: str) -> torch.nn.Module:
    import transformers as T

    small = dict(vocab_size=VOCAB, initializer_range=0.2)
    configs = {
        "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **small)),
        "opt": lambda: T.OPTForCausalLM(T.OPTConfig(
            hidden_size=64, ffn_dim=176, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=128, word_embed_proj_dim=64, vocab_size=VOCAB, init_std=0.2)),
        "falcon": lambda: T.FalconForCausalLM(T.FalconConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **small)),
        "gptj": lambda: T.GPTJForCausalLM(T.GPTJConfig(
            n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128,
            bos_token_id=0, eos_token_id=0, **small)),
        "bloom": lambda: T.BloomForCausalLM(T.BloomConfig(
            hidden_size=64, n_layer=2, n_head=4, **small)),
        "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(
            n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0,
            **small)),
    }  # fmt: skip
    torch.manual_seed(0)
    return configs[name]().eval()


def build(name: str) -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    if name in VISION:
        tv = _torchvision()
        model, batch, hw = {
            "resnet18": (tv.resnet18, 4, 224),
            "mobilenet_v3_small": (tv.mobilenet_v3_small, 4, 224),
            "efficientnet_b0": (tv.efficientnet_b0, 2, 224),
            "vit_small": (
                lambda: tv.VisionTransformer(
                    image_size=64,
                    patch_size=8,
                    num_layers=4,
                    num_heads=4,
                    hidden_dim=256,
                    mlp_dim=512,
                ),
                4,
                64,
            ),
            "swin_t": (tv.swin_t, 1, 224),
        }[name]
        model = model().eval()
        if name == "vit_small":  # torchvision starts its head at zeros: outputs would be 0
            torch.nn.init.normal_(model.heads.head.weight, std=0.02)
        return model, (torch.randn(batch, 3, hw, hw),)
    import transformers as T

    ids = torch.randint(0, VOCAB, (2, 32))
    if name == "distilbert":
        cfg = T.DistilBertConfig(vocab_size=VOCAB, dim=128, n_layers=2, n_heads=4, hidden_dim=256)
        return T.DistilBertModel(cfg).eval(), (ids,)
    if name == "t5enc":
        cfg = T.T5Config(
            vocab_size=VOCAB, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4
        )
        return T.T5EncoderModel(cfg).eval(), (ids,)
    if name == "whisper_enc":
        cfg = T.WhisperConfig(
            vocab_size=VOCAB, d_model=64, encoder_layers=2, encoder_attention_heads=4,
            decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
            num_mel_bins=80, max_source_positions=100, pad_token_id=0, bos_token_id=1,
            eos_token_id=2, decoder_start_token_id=1,
        )  # fmt: skip
        return T.WhisperModel(cfg).encoder.eval(), (torch.randn(1, 80, 200),)
    return causal_lm(name), (ids,)


def _leaves(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, tuple | list):
        return [t for x in out for t in _leaves(x)]
    return []


def _refused(cases: dict) -> dict:
    """Runs each bad request; what it raised (a hetero error is what we want)."""
    from hetero.errors import HeteroError

    out = {}
    for label, call in cases.items():
        try:
            with torch.no_grad():
                call()
            out[label] = "answered (no error)"
        except HeteroError as e:
            out[label] = f"ok: {type(e).__name__}"
        except Exception as e:  # anything else is a finding
            out[label] = f"{type(e).__name__}: {str(e)[:160]}"
    return out


def interleaved_ms(engines: dict[str, Callable[[], object]], calls: int) -> dict[str, float]:
    """Median ms per call of each engine, called in turns (a burst of load on the shared box
    falls on all of them, not on whichever ran during it)."""
    times: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(calls):
        for k, f in engines.items():
            t = time.perf_counter()
            f()
            times[k].append(1e3 * (time.perf_counter() - t))
    return {k: statistics.median(v) for k, v in times.items()}


def forward_row(name: str, calls: int) -> dict:
    import hetero

    model, x = build(name)
    with torch.no_grad():
        ref = model(*x)
    row: dict = {"model": name, "task": "forward"}
    t0 = time.perf_counter()
    try:
        cm = hetero.compile(model, x)
    except Exception as e:  # the row says what failed
        return {**row, "compiled": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
    row["compile_s"] = round(time.perf_counter() - t0, 1)
    row["backends"] = sorted({p.backend for p in cm.plan.partitions})
    with torch.no_grad():
        got = cm(*x)
    a, b = _leaves(ref), _leaves(got)
    err = max((r - g).abs().max().item() for r, g in zip(a, b, strict=True))
    scale = max(r.abs().max().item() for r in a)
    row.update(compiled=True, max_abs=err, max_rel=err / max(scale, 1e-30))
    compiled = torch.compile(model)
    engines = {
        "hetero": lambda: cm(*x),
        "eager": lambda: model(*x),
        "torch.compile": lambda: compiled(*x),
    }
    with torch.no_grad():
        for f in engines.values():
            f(), f()
        row["load"] = os.getloadavg()[0]
        row["ms"] = {k: round(ms, 3) for k, ms in interleaved_ms(engines, calls).items()}
    x0 = x[0]
    bad = {
        "rank": lambda: cm(x0[0]),
        "batch+1": lambda: cm(torch.cat([x0, x0[:1]])),
        "last dim+1": lambda: cm(torch.cat([x0, x0[..., :1]], dim=-1)),
        "a list": lambda: cm(x0.tolist()),
        "no input": lambda: cm(),
    }
    if x0.is_floating_point():
        bad["float64"] = lambda: cm(x0.double())
    else:
        bad.update(
            float32=lambda: cm(x0.float()),
            **{"id >= vocab": lambda: cm(x0.clone().fill_(10**6))},
            **{"id < 0": lambda: cm(x0.clone().fill_(-1))},
        )
    row["bad"] = _refused(bad)
    cm.shutdown()
    return row


def generate_row(name: str) -> dict:
    import hetero

    model = causal_lm(name)
    prompt = torch.randint(0, VOCAB, (1, 11), generator=torch.Generator().manual_seed(1))
    row: dict = {"model": name, "task": "generate"}
    t0 = time.perf_counter()
    try:
        lm = hetero.compile(
            model, task="generate", cluster=ROOT / "configs/clusters/cpu-2core.yaml", max_length=64
        )
    except Exception as e:  # the row says what failed
        return {**row, "compiled": False, "error": f"{type(e).__name__}: {str(e)[:600]}"}
    row.update(compiled=True, compile_s=round(time.perf_counter() - t0, 1))
    kw = dict(
        max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )  # fmt: skip
    with torch.no_grad():
        ours = lm.generate(prompt, 32)
        theirs = model.generate(prompt, **kw)[:, prompt.shape[1] :]
        row["tokens_equal"] = bool(torch.equal(ours, theirs))
        row["load"] = os.getloadavg()[0]
        engines = {
            "hetero": lambda: lm.generate(prompt, 32),
            "eager": lambda: model.generate(prompt, **kw),
        }
        row["ms"] = {k: round(ms, 1) for k, ms in interleaved_ms(engines, 5).items()}
    row["bad"] = _refused({
        "prompt too long": lambda: lm.generate(torch.randint(0, VOCAB, (1, 70)), 4),
        "prompt + new > cache": lambda: lm.generate(torch.randint(0, VOCAB, (1, 60)), 10),
        "id >= vocab": lambda: lm.generate(torch.full((1, 5), 5000), 4),
        "id < 0": lambda: lm.generate(torch.full((1, 5), -3), 4),
        "float prompt": lambda: lm.generate(prompt.float(), 4),
        "batch 2": lambda: lm.generate(prompt.repeat(2, 1), 4),
        "empty prompt": lambda: lm.generate(prompt[:, :0], 4),
        "max_new_tokens=0": lambda: lm.generate(prompt, 0),
        "max_new_tokens=2.5": lambda: lm.generate(prompt, 2.5),
        "temperature=-1": lambda: lm.generate(prompt, 4, temperature=-1.0),
        "temperature=nan": lambda: lm.generate(prompt, 4, temperature=float("nan")),
        "top_k=-1": lambda: lm.generate(prompt, 4, temperature=1.0, top_k=-1),
        "do_sample=True": lambda: lm.generate(prompt, 4, do_sample=True),
    })  # fmt: skip
    lm.shutdown()
    return row


def _one(job: str, calls: int) -> dict:
    # before transformers, which imports torchvision where it is installed
    with contextlib.suppress(ImportError):
        _torchvision()
    kind, _, name = job.rpartition(":")
    return generate_row(name) if kind == "gen" else forward_row(name, calls)


def _table(rows: list[dict]) -> str:
    head = "| model | task | compiled | max abs / rel error | hetero | eager | torch.compile | load | bad inputs refused |"
    lines = [head, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | --- |"]
    for r in rows:
        if not r.get("compiled"):
            lines.append(
                f"| {r['model']} | {r['task']} | no: {r.get('error', '')[:80]} | | | | | | |"
            )
            continue
        ms = r["ms"]
        if r["task"] == "generate":
            err = "tokens equal" if r["tokens_equal"] else "TOKENS DIFFER"
        else:
            err = f"{r['max_abs']:.1e} / {r['max_rel']:.1e}"
        bad = r["bad"]
        ok = sum(v.startswith("ok") for v in bad.values())
        missed = [k for k, v in bad.items() if not v.startswith("ok")]
        lines.append(
            f"| {r['model']} | {r['task']} | yes ({r['compile_s']} s) | {err} | {ms['hetero']} | "
            f"{ms['eager']} | {ms.get('torch.compile', '')} | {r['load']:.1f} | {ok}/{len(bad)}"
            + (f" (not: {', '.join(missed)})" if missed else "")
            + " |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("jobs", nargs="*", help="model names; gen:NAME for task=generate")
    ap.add_argument("--calls", type=int, default=20, help="warm calls per engine (forward)")
    ap.add_argument("--one", help=argparse.SUPPRESS)  # a child process: one job, JSON out
    ap.add_argument("--out", type=Path, default=HERE / "results/unnamed_models_cpu.json")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(_one(args.one, args.calls)))
        return
    jobs = args.jobs or [*VISION, *ENCODERS, *LMS, *(f"gen:{n}" for n in GENERATE)]
    env = {**os.environ, **{k: v for k, v in THREAD_ENV.items() if k not in os.environ}}
    rows = []
    for job in jobs:
        cmd = [sys.executable, __file__, "--one", job, "--calls", str(args.calls)]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = done.stdout.strip().splitlines()
        try:
            row = json.loads(lines[-1])
        except (IndexError, json.JSONDecodeError):
            kind = "generate" if job.startswith("gen:") else "forward"
            tail = done.stderr.strip().splitlines()[-3:]
            row = {
                "model": job.removeprefix("gen:"),
                "task": kind,
                "compiled": False,
                "error": " ".join(tail),
            }
        rows.append(row)
        print(_table([row]).splitlines()[-1], flush=True)
        _write(args.out, rows)  # after each row: a run cut short keeps what it measured
    print(_table(rows))


def _write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "thread_env": {k: os.environ.get(k, v) for k, v in THREAD_ENV.items()},
        "rows": rows,
    }
    path.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
