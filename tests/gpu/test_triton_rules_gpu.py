"""The Triton rules for modern models on a real GPU, at realistic sizes: correctness against
eager, and a timing line per case (eager, torch.compile default and reduce-overhead, hetero).

Skipped where CUDA is absent. Run (repository root, TRITON_INTERPRET unset):

    python -m pytest tests/gpu/test_triton_rules_gpu.py -s -q

`-s` shows the timing table. HETERO_RULES_JSON=path appends one JSON line per case;
HETERO_RULES_MODES=default,reduce-overhead picks the torch.compile modes to compare
(empty: none). Cases (float16 unless named): RMSNorm with its residual add, rotary on q and
k, the SwiGLU MLP (alone, and after an RMSNorm that becomes its prologue), grouped-query
attention prefill, one-token decode attention over a 4096-long
cache (LLaMA-7B and LLaMA-3-8B head layouts), a whole decode step of a LLaMA layer, the
1.1B LLaMA shape end to end, and ConvNeXt-T / MobileNetV3 blocks at batch 32.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import pytest
import torch
import torch.nn.functional as F

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


# ---- the modules, one per rule (weights random, nothing downloaded) ----------------------------


class ResidualRMSNorm(torch.nn.Module):
    """A decoder layer's residual add and the RMSNorm after it (LlamaRMSNorm)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(dim)
        with torch.no_grad():
            self.norm.weight.uniform_(0.5, 1.5)

    def forward(self, x, r):
        h = x + r
        return h, self.norm(h)


class RotaryQK(torch.nn.Module):
    """q and k projections' outputs reshaped to heads, then apply_rotary_pos_emb."""

    def __init__(self, heads: int, kv_heads: int, head_dim: int, tokens: int) -> None:
        super().__init__()
        from transformers import LlamaConfig
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        cfg = LlamaConfig(hidden_size=heads * head_dim, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, max_position_embeddings=tokens)  # fmt: skip
        self.rotary = LlamaRotaryEmbedding(cfg)
        self.h, self.hk, self.d = heads, kv_heads, head_dim

    def forward(self, q_lin, k_lin):
        from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

        b, s, _ = q_lin.shape
        q = q_lin.view(b, s, self.h, self.d).transpose(1, 2)
        k = k_lin.view(b, s, self.hk, self.d).transpose(1, 2)
        pos = torch.arange(s, device=q_lin.device)[None, :].expand(b, s)
        cos, sin = self.rotary(q_lin, pos)
        return apply_rotary_pos_emb(q, k, cos, sin)


def swiglu(dim: int, inter: int) -> torch.nn.Module:
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    torch.manual_seed(0)
    return LlamaMLP(LlamaConfig(hidden_size=dim, intermediate_size=inter))


class NormMLP(torch.nn.Module):
    """post_attention_layernorm then the SwiGLU MLP: the norm becomes the gated matmul's
    prologue (few rows) or a row kernel that writes only 1/rms (many rows)."""

    def __init__(self, dim: int, inter: int) -> None:
        super().__init__()
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        self.norm = LlamaRMSNorm(dim)
        self.mlp = swiglu(dim, inter)

    def forward(self, x):
        return self.mlp(self.norm(x))


class GqaPrefill(torch.nn.Module):
    """transformers' sdpa_attention_forward, causal, over grouped key/value heads."""

    def __init__(self, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.num_key_value_groups = heads // kv_heads
        self.is_causal = True

    def forward(self, q, k, v):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        out, _ = sdpa_attention_forward(self, q, k, v, None, scaling=q.shape[-1] ** -0.5)
        return out


class CacheDecode(torch.nn.Module):
    """One query token per sequence against a KV cache of max_len rows, pos + 1 of them valid."""

    def forward(self, q, keys, values, pos):
        valid = torch.arange(keys.shape[2], device=q.device) <= pos
        mask = valid[None, None, None, :].expand(q.shape[0], 1, 1, keys.shape[2])
        gqa = q.shape[1] != keys.shape[1]
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=gqa)


class LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


def _cases():
    """name -> () -> (model, inputs on the GPU, dtype)."""
    from triton_models import ConvNeXtBlock, LlamaDecodeStep, MobileBlock, decoder

    h, bf = torch.float16, torch.bfloat16
    dev = "cuda"

    def rn(*shape, dtype=h):
        return torch.randn(*shape, device=dev, dtype=dtype)

    def cache(b, hq, hk, dtype=h):
        pos = torch.tensor([3000], device=dev)
        return CacheDecode(), (rn(b, hq, 1, 128, dtype=dtype), rn(b, hk, 4096, 128, dtype=dtype),
                               rn(b, hk, 4096, 128, dtype=dtype), pos), dtype  # fmt: skip

    def decode_step(batch: int):
        m = LlamaDecodeStep(dim=4096, heads=32, kv_heads=8, inter=14336, max_len=4096)
        return m, tuple(t.to(dev) for t in m.inputs(batch, 3000, h)), h

    def llama_1b():
        m = decoder("Llama", layers=2, dim=2048, heads=32, kv_heads=4, inter=5632, vocab=32000,
                    ctx=2048)  # fmt: skip
        return LastHidden(m), (torch.randint(0, 32000, (4, 256), device=dev),), h

    return {
        "rmsnorm_residual 1024x4096": lambda: (ResidualRMSNorm(4096), (rn(4, 256, 4096), rn(4, 256, 4096)), h),
        "rmsnorm_residual decode 1x4096": lambda: (ResidualRMSNorm(4096), (rn(1, 1, 4096), rn(1, 1, 4096)), h),
        "rotary q32/k8 heads 4x256": lambda: (RotaryQK(32, 8, 128, 256), (rn(4, 256, 4096), rn(4, 256, 1024)), h),
        "swiglu 1024x4096x11008": lambda: (swiglu(4096, 11008), (rn(4, 256, 4096),), h),
        "swiglu decode 1x4096x11008": lambda: (swiglu(4096, 11008), (rn(1, 1, 4096),), h),
        "rmsnorm+swiglu decode 1x4096x14336": lambda: (NormMLP(4096, 14336), (rn(1, 1, 4096),), h),
        "rmsnorm+swiglu 1024x4096x14336": lambda: (NormMLP(4096, 14336), (rn(4, 256, 4096),), h),
        "swiglu bf16 1024x4096x11008": lambda: (swiglu(4096, 11008), (rn(4, 256, 4096, dtype=bf),), bf),
        "gqa prefill 4x32/8x1024x128 causal": lambda: (GqaPrefill(32, 8), (rn(4, 32, 1024, 128), rn(4, 8, 1024, 128), rn(4, 8, 1024, 128)), h),
        "decode attention llama7b 1x32/32 4096": lambda: cache(1, 32, 32),
        "decode attention llama3-8b 1x32/8 4096": lambda: cache(1, 32, 8),
        "decode attention bf16 8x32/8 4096": lambda: cache(8, 32, 8, bf),
        "decode step llama3-8b layer b1": lambda: decode_step(1),
        "llama 1.1B shape 2 layers 4x256": llama_1b,
        "convnext-t block 32x96x56x56": lambda: (ConvNeXtBlock(96), (rn(32, 96, 56, 56),), h),
        "mobilenetv3 block 32x40x28x28": lambda: (MobileBlock(40, 120), (rn(32, 40, 28, 28),), h),
    }  # fmt: skip


# ---- timing --------------------------------------------------------------------------------------


def _bench(fn, args, loops: int = 7, calls: int = 20) -> float:
    """Median ms per call over `loops` loops of `calls` calls (CUDA events), after 3 warm-ups."""
    with torch.no_grad():
        for _ in range(3):
            fn(*args)
        torch.cuda.synchronize()
        times = []
        for _ in range(loops):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(calls):
                fn(*args)
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def _first(out):
    return out[0] if isinstance(out, tuple | list) else out


def _error(got, want) -> float:
    got, want = _first(got).float(), _first(want).float()
    return float((got - want).norm() / max(float(want.norm()), 1e-12))


@pytest.mark.parametrize("name", list(_cases()))
def test_rule_on_gpu_matches_eager_and_is_timed(name, tmp_path):
    from triton_models import assert_close, build

    from hetero.backends.base import CompileOptions
    from hetero.backends.triton import TritonBackend

    model, args, dtype = _cases()[name]()
    model = model.to("cuda", dtype).eval()
    with torch.no_grad():
        want = model(*args)
    t0 = time.perf_counter()
    run, _ = build(TritonBackend(), model, args, tmp_path,
                   CompileOptions(extra=(("clone_outputs", False),)))  # fmt: skip
    compile_s = time.perf_counter() - t0
    got = run(*args)  # outputs live in the CUDA graph's pool: check them before timing
    wants = want if isinstance(want, tuple | list) else (want,)
    for g, w in zip(got, wants, strict=True):
        assert_close(g, w, dtype)
    err = _error(got, want)
    plan = (tmp_path / "artifact" / "fusion.txt").read_text().splitlines()
    rules: dict[str, int] = {}
    for line in plan:
        kind, rule = line.split()[1:3]
        if kind != "aten":
            rules[rule] = rules.get(rule, 0) + 1

    row = {"case": name, "dtype": str(dtype).removeprefix("torch."), "rules": rules,
           "hetero_ms": _bench(run, args), "eager_ms": _bench(model, args),
           "hetero_compile_s": round(compile_s, 1), "hetero_err": err}  # fmt: skip
    modes = os.environ.get("HETERO_RULES_MODES", "default,reduce-overhead")
    for mode in [m for m in modes.split(",") if m]:
        torch._dynamo.reset()
        compiled = torch.compile(model, mode=mode)
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                out = compiled(*args)
            row[f"compile[{mode}]_s"] = round(time.perf_counter() - t0, 1)
            row[f"compile[{mode}]_err"] = _error(out, want)
            row[f"compile[{mode}]_ms"] = _bench(compiled, args)
        except Exception as e:  # a baseline that fails is reported, not hetero's failure
            row[f"compile[{mode}]_failed"] = f"{type(e).__name__}: {str(e)[:200]}"
    best = min((v for k, v in row.items() if k.startswith("compile[") and k.endswith("_ms")),
               default=None)  # fmt: skip
    ratio = f"  hetero/best-compile {row['hetero_ms'] / best:.2f}x" if best else ""
    timings = "  ".join(
        f"{k.removesuffix('_ms')} {v:.3f}" for k, v in row.items() if k.endswith("_ms")
    )
    failed = {k: v for k, v in row.items() if k.endswith("_failed")}
    print(f"\n[{torch.cuda.get_device_name()}] {name} ({row['dtype']}): {timings} ms{ratio}  "
          f"rules {rules}  err {row['hetero_err']:.1e}{'  ' + str(failed) if failed else ''}")  # fmt: skip
    out_path = os.environ.get("HETERO_RULES_JSON")
    if out_path:
        with open(out_path, "a") as f:
            f.write(json.dumps({"gpu": torch.cuda.get_device_name(), **row}) + "\n")
