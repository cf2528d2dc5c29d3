"""The rules for modern models on the graphs hetero really captures, then their kernels.

First which rules match (no kernel runs): transformers' LLaMA, Qwen2 and Mistral built from
tiny config objects, a one-token decode step through a LlamaDecoderLayer against a KV cache,
and MobileNet/ConvNeXt-style conv blocks. Then every rule's kernels run in Triton's
interpreter against eager in float32, float16 and bfloat16.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported anywhere

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from triton_models import (
    ConvNeXtBlock,
    ConvStem,
    LlamaDecodeStep,
    MobileBlock,
    assert_close,
    build,
    decoder,
    unit_of,
)

from hetero.backends.base import CompileOptions
from hetero.backends.triton import TritonBackend
from hetero.backends.triton.backend import prepare
from hetero.backends.triton.fuse import fuse
from hetero.backends.triton.fusion import numel
from hetero.backends.triton.matchers import gated_pair, rms_chain, rope_at
from hetero.backends.triton.rewrite import PROLOGUE_ROWS

aten = torch.ops.aten
FAMILIES = ["Llama", "Qwen2", "Mistral"]


def plan_of(model, *args):
    unit = unit_of(model, *args)
    folded = prepare(unit.module, unit.inputs, unit.param_values, unit.example_inputs)
    return fuse(folded.module), folded.module


def rules(plan) -> Counter:
    return Counter(s.rule for s in plan.steps if s.kind != "aten")


def targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


# ---- which rules match the captured graphs ---------------------------------------------------


def prologues(plan) -> int:
    """Matmul kernels that compute an RMSNorm's statistic from their A tiles."""
    return sum(
        1
        for s in plan.steps
        if s.kind in ("matmul", "gated") and any(n.target is aten.mean.dim for n in s.nodes)
    )


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tokens", [8, 40])
def test_decoder_layers_match_every_rule(family, tokens):
    layers = 2
    model = decoder(family, layers=layers, **({"sliding_window": 4} if family == "Mistral" else {}))
    plan, gm = plan_of(model, torch.randint(0, 128, (2, tokens)))
    found = rules(plan)
    if 2 * tokens <= PROLOGUE_ROWS:
        # each layer's two norms ride in the matmuls that read them (q, k, v; gate+up)
        assert found["rmsnorm"] == 1 and prologues(plan) == 4 * layers
    else:
        # one row kernel per norm writes only 1/rms; the matmuls scale their rows by it
        assert found["rmsnorm"] == 2 * layers + 1 and prologues(plan) == 0
        stats = [s for s in plan.steps if s.rule == "rmsnorm"][: 2 * layers]
        assert all(numel(o) == 2 * tokens for s in stats for o in s.outputs)
    assert found["rotary"] == layers  # the query's and the key's in one launch
    assert found["gated"] == layers
    assert found["attention"] == layers
    rot = [s for s in plan.steps if s.rule == "rotary"]
    assert all(len(s.outputs) == 2 for s in rot)
    # grouped-query attention reads the shared key/value heads: no repeat_kv copies left
    sdpa = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert all(n.kwargs.get("enable_gqa") for n in sdpa)
    assert targets(gm)[aten.clone.default] == 0 and targets(gm)[aten.expand.default] == 0
    # no RMSNorm square or statistic leaves a matmul kernel (it would go to memory in fp32)
    stat = {aten.pow.Tensor_Scalar, aten.mean.dim, aten.rsqrt.default}
    for s in plan.steps:
        if s.kind in ("matmul", "gated"):
            assert not {o.target for o in s.outputs} & stat
            assert all(numel(o) == numel(s.anchor) for o in s.outputs)
    # the gated kernel holds both projections; only their product leaves it
    (g,) = [s for s in plan.steps if s.rule == "gated"][:1]
    assert sum(n.target is aten.mm.default for n in g.nodes) == 2 and len(g.outputs) == 1


def test_decode_step_matches_split_k_attention_rotary_and_gated():
    model = LlamaDecodeStep(max_len=64)
    plan, _ = plan_of(model, *model.inputs(2, 5))
    found = rules(plan)
    assert found["decode"] == 1 and found["attention"] == 0
    assert found["rotary"] == 1 and found["gated"] == 1
    assert found["rmsnorm"] == 0 and prologues(plan) == 4  # both norms are matmul prologues
    (dec,) = [s for s in plan.steps if s.rule == "decode"]
    assert dec.space == (2, 4, 1, 64)  # B, H, one query, the whole cache


@pytest.mark.parametrize(
    ("block", "shape", "convs"),
    [(MobileBlock, (2, 8, 6, 6), 3), (ConvNeXtBlock, (2, 8, 6, 6), 1), (ConvStem, (2, 3, 8, 8), 2)],
)
def test_conv_blocks_fold_batch_norm_and_fuse_epilogues(block, shape, convs):
    plan, gm = plan_of(block().eval(), torch.randn(*shape))
    assert rules(plan)["conv"] == convs
    assert targets(gm)[aten._native_batch_norm_legit_no_training.default] == 0
    steps = [s for s in plan.steps if s.kind == "conv"]
    if block is MobileBlock:  # hardswish, relu6, residual: each in its convolution's epilogue
        assert [len(s.nodes) for s in steps] == [6, 2, 2]
    if block is ConvStem:
        assert {aten.relu.default} <= {n.target for n in steps[0].nodes}
        assert {aten.gelu.default, aten.add.Tensor} <= {n.target for n in steps[1].nodes}


def test_matchers_reject_near_misses():
    class Near(torch.nn.Module):
        def forward(self, x, cos, sin):
            d = x.shape[-1] // 2
            rot = torch.cat((x[..., d:], -x[..., :d]), dim=-1)  # wrong sign: not rotate_half
            y = x * cos + rot * sin
            ms = y.pow(3).mean(-1, keepdim=True)  # not a square
            return y * torch.rsqrt(ms + 1e-6)

    x, c = torch.randn(2, 2, 4, 8), torch.randn(1, 1, 4, 8)
    plan, gm = plan_of(Near(), x, c, c)
    assert not [n for n in gm.graph.nodes if rope_at(n)]
    assert not [n for n in gm.graph.nodes if n.op != "output" and rms_chain(n)]
    assert rules(plan)["rotary"] == rules(plan)["rmsnorm"] == 0


def test_gated_pair_needs_the_same_input():
    class TwoInputs(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g, self.u = (
                torch.nn.Linear(16, 24, bias=False),
                torch.nn.Linear(16, 24, bias=False),
            )

        def forward(self, x, z):
            return F.silu(self.g(x)) * self.u(z)

    _, gm = plan_of(TwoInputs(), torch.randn(3, 16), torch.randn(3, 16))
    assert not [n for n in gm.graph.nodes if n.target is aten.mm.default and gated_pair(n)]


# ---- the kernels against eager ---------------------------------------------------------------

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check(model, args, dtype, tmp_path, options=None):
    model = model.to(dtype).eval()
    args = tuple(a.to(dtype) if a.is_floating_point() else a for a in args)
    with torch.no_grad():
        want = model(*args)
    run, man = build(TritonBackend(), model, args, tmp_path, options)
    got = run(*args)
    want = want if isinstance(want, tuple) else (want,)
    for g, w in zip(got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype
        assert_close(g, w, dtype)
    return man


class LastHidden(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids):
        return self.model(ids).last_hidden_state


@pytest.mark.parametrize(
    ("family", "dtype", "tokens"),
    [("Llama", d, 8) for d in DTYPES]
    + [("Llama", torch.bfloat16, 40), ("Qwen2", torch.bfloat16, 8), ("Mistral", torch.float16, 40)],
)
def test_decoder_prefill_matches_eager(family, dtype, tokens, tmp_path):
    # 2 x 8 tokens: norms as matmul prologues; 2 x 40: a shared 1/rms row kernel
    extra = {"sliding_window": 4} if family == "Mistral" else {}
    model = LastHidden(decoder(family, **extra))
    _check(model, (torch.randint(0, 128, (2, tokens)),), dtype, tmp_path)


@pytest.mark.parametrize(("dtype", "pos"), [(d, 37) for d in DTYPES] + [(torch.float16, 3)])
def test_decode_step_matches_eager(dtype, pos, tmp_path):
    # 64 cache rows in pieces of 32 (the interpreter's split): pos 37 leaves the second piece
    # partly valid, pos 3 leaves it empty (its partial result must not count)
    model = LlamaDecodeStep(max_len=64)
    _check(model, model.inputs(2, pos), dtype, tmp_path)


class GqaAttention(torch.nn.Module):
    """SDPA over grouped key/value heads, as transformers calls it with enable_gqa."""

    def __init__(self, causal: bool, mask: str | None = None) -> None:
        super().__init__()
        self.causal, self.mask = causal, mask

    def forward(self, q, k, v, lengths):
        mask = None
        if self.mask is not None:
            keep = torch.arange(k.shape[2])[None, :] < lengths[:, None]
            mask = keep[:, None, None, :]
            if self.mask == "float":
                mask = torch.zeros(mask.shape, dtype=q.dtype).masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal, enable_gqa=True
        )


@pytest.mark.parametrize(
    ("m", "n", "causal", "mask", "dtype", "rule"),
    [
        (9, 9, True, None, torch.float16, "attention"),  # prefill, GQA heads mapped in place
        (1, 40, False, "bool", torch.bfloat16, "decode"),  # one token, split over keys
        (2, 40, False, "float", torch.float32, "decode"),  # two query rows, additive mask
    ],
)
def test_grouped_query_attention_kernels(m, n, causal, mask, dtype, rule, tmp_path):
    g = torch.Generator().manual_seed(m * n)
    q = torch.randn(2, 4, m, 16, generator=g)
    k, v = (torch.randn(2, 2, n, 16, generator=g) for _ in range(2))
    model = GqaAttention(causal, mask)
    args = (q, k, v, torch.tensor([n, n // 3]))
    plan, _ = plan_of(model, *args)
    assert rules(plan)[rule] == 1
    _check(model, args, dtype, tmp_path)


class GeGLU(torch.nn.Module):
    """A gated MLP with GELU and biases elsewhere: the gated rule is not SwiGLU-only."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(24, 40, bias=False)
        self.up = torch.nn.Linear(24, 40, bias=False)
        self.down = torch.nn.Linear(40, 24)

    def forward(self, x):
        return self.down(F.gelu(self.gate(x), approximate="tanh") * self.up(x)) + x


def test_geglu_gated_matmul(tmp_path):
    plan, _ = plan_of(GeGLU(), torch.randn(3, 5, 24))
    assert rules(plan)["gated"] == 1
    _check(GeGLU(), (torch.randn(3, 5, 24),), torch.float16, tmp_path)


@pytest.mark.parametrize(
    ("block", "shape", "dtype", "channels_last"),
    [
        (MobileBlock, (2, 8, 6, 6), torch.float32, None),
        (MobileBlock, (2, 8, 6, 6), torch.float16, None),
        (MobileBlock, (2, 8, 6, 6), torch.bfloat16, None),
        (ConvNeXtBlock, (2, 8, 6, 6), torch.float16, None),
        (ConvNeXtBlock, (2, 8, 6, 6), torch.float32, True),
        (ConvStem, (2, 3, 8, 8), torch.bfloat16, None),
        (ConvStem, (2, 3, 8, 8), torch.float16, False),
    ],
)
def test_conv_blocks_match_eager(block, shape, dtype, channels_last, tmp_path):
    options = None
    if channels_last is not None:
        options = CompileOptions(extra=(("channels_last", channels_last),))
    _check(block(), (torch.randn(*shape),), dtype, tmp_path, options)


def test_channels_last_flows_from_convolution_to_convolution(tmp_path):
    """float16 weights go channels-last; each epilogue then walks its convolution's output
    in NHWC order and hands the next convolution NHWC (only the graph output is NCHW)."""
    import json
    import sys

    model = MobileBlock().half().eval()
    x = torch.randn(2, 8, 6, 6, dtype=torch.float16)
    run, _ = build(TritonBackend(), model, (x,), tmp_path)
    art = tmp_path / "artifact"
    config = json.loads((art / "triton.json").read_text())
    assert len(config["channels_last"]) == 3
    assert "'channels_last': True" in (art / "program.py").read_text()
    program = next(
        m
        for m in list(sys.modules.values())
        if getattr(m, "__file__", "") == str(art / "program.py")
    )
    arrived_nhwc = []
    real = program._cl_input
    program._cl_input = lambda t, cfg: arrived_nhwc.append(_nhwc(t)) or real(t, cfg)
    try:
        (got,) = run(x)
    finally:
        program._cl_input = real
    # the model's input arrives NCHW; every later convolution gets its producer's NHWC output
    assert arrived_nhwc == [False, True, True]
    assert got.is_contiguous()
    with torch.no_grad():
        assert_close(got, model(x), torch.float16)


def _nhwc(t: torch.Tensor) -> bool:
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
