"""The split stage's program: matmuls rewritten to run partly on the GPU, partly on the CPU,
compute what they computed (here both shares run on the CPU, through the same op)."""

from __future__ import annotations

import pytest
import torch
from llm_models import captured_llama
from split_programs import split_calls, split_graph, split_module

from hetero.backends.gpu_cpu_mm import gpu_cpu_mlp, gpu_cpu_mm, mlp_share
from hetero.partitioner.phases import Phase
from hetero.partitioner.split import param_values
from hetero.runtime.split_linear import SharedMatmuls, gpu_rows


class Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q = torch.nn.Linear(32, 48, bias=False)
        self.k = torch.nn.Linear(32, 16, bias=True)  # addmm
        self.o = torch.nn.Linear(64, 32, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(torch.cat([self.q(x), self.k(x)], dim=-1).relu())


@pytest.mark.parametrize("fraction", [0.0, 0.3, 1.0])
def test_split_program_computes_the_same(fraction):
    torch.manual_seed(0)
    block = Block().eval()
    x = torch.randn(3, 32)
    module, args, groups = split_module(block, x, fraction)
    assert len(groups) == 2  # q and k share x: one hand-off; o another
    assert sum(len(g.weights) for g in groups) == 3
    (out,) = module(*args)
    torch.testing.assert_close(out, block(x), rtol=1e-5, atol=1e-6)


def test_gpu_rows_keep_tiles_on_real_layers():
    assert gpu_rows(4096, 0.45) % 64 == 0
    assert gpu_rows(48, 0.5) == 24
    assert gpu_rows(100, 0.0) == 0 and gpu_rows(100, 1.0) == 100


class Mlp(torch.nn.Module):
    """A LLaMA-style MLP (gated) or a plain one, with the activations gated models use."""

    ACTS = {
        "silu": torch.nn.SiLU(),
        "gelu": torch.nn.GELU(),
        "gelu_tanh": torch.nn.GELU(approximate="tanh"),
        "relu": torch.nn.ReLU(),
    }

    def __init__(self, hidden: int, features: int, act: str, gated: bool) -> None:
        super().__init__()
        self.gate = torch.nn.Linear(hidden, features, bias=False) if gated else None
        self.up = torch.nn.Linear(hidden, features, bias=False)
        self.down = torch.nn.Linear(features, hidden, bias=False)
        self.act = self.ACTS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is None:
            return self.down(self.act(self.up(x)))
        return self.down(self.act(self.gate(x)) * self.up(x))


def _split(module: torch.nn.Module, x: torch.Tensor, fraction: float, cpu_dtype=None):
    """(the split program's output, its groups, the op targets it calls)."""
    split, args, groups = split_module(module, x, fraction, cpu_dtype)
    (out,) = split(*args)
    return out, groups, split_calls(split)


@pytest.mark.parametrize(
    ("act", "gated"), [("silu", True), ("gelu", True), ("gelu_tanh", True), ("relu", False)]
)
@pytest.mark.parametrize(("features", "fraction"), [(40, 0.0), (40, 0.3), (40, 1.0), (1088, 0.45)])
def test_an_mlp_is_one_hand_off_and_computes_the_unsplit_mlp(act, gated, features, fraction):
    torch.manual_seed(0)
    mlp = Mlp(16, features, act, gated).eval()
    x = torch.randn(1, 3, 16)
    out, groups, calls = _split(mlp, x, fraction)
    assert calls == [gpu_cpu_mlp]
    (group,) = groups
    assert group.act == act and group.gated == gated
    r = gpu_rows(features, fraction)
    assert group.gpu_rows == (r,) * len(group.weights)
    if features >= 1024:
        assert r % 64 == 0 and 0 < r < features  # whole tiles on both sides
    # only the order of the sum over the features differs
    torch.testing.assert_close(out, mlp(x), rtol=1e-5, atol=1e-5)


def test_the_cpu_share_keeps_downs_columns_in_downs_own_order():
    """The host's product reads the CPU's down block as x @ W.T over [hidden, features]
    rows, its fast GEMV (h @ W over [features, hidden] ran float16 at 0.3 GB/s on torch
    2.13's CPU); the GPU's share stacks down's columns transposed."""
    torch.manual_seed(0)
    hidden, features, r = 16, 40, 12
    w = {n: torch.randn(features, hidden) for n in ("gate", "up")} | {
        "down": torch.randn(hidden, features)
    }
    group = SharedMatmuls(("gate", "up", "down"), (r,) * 3, (features,) * 3, "silu", True)
    gpu, cpu = group.cut(w)
    assert torch.equal(gpu[2 * r :], w["down"][:, :r].t())
    host_down = cpu[2 * (features - r) :]
    assert host_down.is_contiguous()
    assert torch.equal(host_down.reshape(hidden, features - r), w["down"][:, r:])
    x = torch.randn(3, hidden)
    h = torch.nn.functional.silu(x @ w["gate"].t()) * (x @ w["up"].t())
    want = h @ w["down"].t()
    got = mlp_share(x, gpu, "silu", True) + mlp_share(x, cpu, "silu", True, host=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_cpu_share_of_an_mlp_runs_in_the_plans_cpu_dtype():
    torch.manual_seed(0)
    mlp = Mlp(64, 256, "silu", gated=True).eval()
    x = torch.randn(1, 5, 64)
    out, _, _ = _split(mlp, x, 0.25, cpu_dtype=torch.bfloat16)
    want = mlp(x)
    assert out.dtype == torch.float32
    # three quarters of the features through bfloat16 (8 bits of mantissa): ~1e-2 relative
    torch.testing.assert_close(out, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())
    assert not torch.equal(out, want)  # it did round: the CPU's share ran in bfloat16


class ReadsInside(Mlp):
    """An MLP whose gate output is also returned: the block cannot become one op."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g = self.gate(x)
        return self.down(self.act(g) * self.up(x)), g


class Deep(torch.nn.Module):
    """mm -> relu -> mm -> relu -> mm: the middle matmul ends one block and starts another."""

    def __init__(self, mid: int = 24) -> None:
        super().__init__()
        self.a = torch.nn.Linear(16, 32, bias=False)
        self.b = torch.nn.Linear(32, mid, bias=False)
        self.c = torch.nn.Linear(mid, 16, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.b(self.a(x).relu()).relu())


def test_what_is_not_a_whole_mlp_splits_by_matmul():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 16)
    reads = ReadsInside(16, 40, "silu", gated=True).eval()
    split, args, groups = split_module(reads, x, 0.5)
    assert not any(g.act for g in groups) and len(groups) == 2  # gate/up share x; down
    for got, want in zip(split(*args), reads(x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    deep = Deep().eval()
    out, groups, calls = _split(deep, x, 0.5)
    # 16 -> 32 -> 24 -> 16: no block's output is as wide as its input
    assert calls == [gpu_cpu_mm, gpu_cpu_mm, gpu_cpu_mm]
    torch.testing.assert_close(out, deep(x), rtol=1e-5, atol=1e-6)
    square = Deep(16).eval()
    out, groups, calls = _split(square, x, 0.5)
    assert calls == [gpu_cpu_mlp, gpu_cpu_mm]  # a -> b fused (16 -> 32 -> 16), c alone
    assert groups[1].act == "relu" and not groups[1].gated
    torch.testing.assert_close(out, square(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize(
    ("act", "gated"), [("silu", True), ("gelu", True), ("gelu_tanh", True), ("relu", False)]
)
def test_a_16_bit_mlp_is_one_hand_off_and_computes_the_unsplit_mlp(dtype, act, gated):
    """A 16-bit SiLU is captured in float32 between casts; the op computes every activation
    in float32 and rounds once, as the graph does."""
    torch.manual_seed(0)
    mlp = Mlp(16, 40, act, gated).eval().to(dtype)
    x = torch.randn(1, 3, 16, dtype=dtype)
    split, args, groups = split_module(mlp, x, 0.3)
    assert split_calls(split) == [gpu_cpu_mlp] and groups[0].act == act
    assert not [n for n in split.graph.nodes if n.target in _ELEMENTWISE]  # all in the op
    (out,) = split(*args)
    assert out.dtype == dtype
    # the partial sums round apart, then add: a rounding or two of the dtype
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, mlp(x), rtol=4 * eps, atol=4 * eps * mlp(x).abs().max().item())


_ELEMENTWISE = (
    torch.ops.aten._to_copy.default,
    torch.ops.aten.sigmoid.default,
    torch.ops.aten.silu.default,
    torch.ops.aten.gelu.default,
    torch.ops.aten.relu.default,
    torch.ops.aten.mul.Tensor,
)


@pytest.fixture(scope="module")
def llamas():
    """A tiny LLaMA captured for generation, by dtype (captured once each per session)."""
    return captured_llama


@pytest.mark.parametrize("phase", list(Phase))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_each_llama_mlp_is_one_op_in_every_dtype(llamas, dtype, phase):
    """A 16-bit LLaMA's SiLU runs in float32 between casts (_to_copy up, x * sigmoid(x),
    _to_copy down): the block still becomes one gpu_cpu_mlp per layer, the casts and the
    activation go with it, and the program computes what it computed."""
    lm = llamas(dtype)
    graph = lm.graph(phase)
    split, bind, groups = split_graph(graph, 0.4)
    calls = split_calls(split)
    assert calls.count(gpu_cpu_mlp) == 2 and len(calls) == 7  # a layer: qkv, o, mlp; lm_head
    assert [g.act for g in groups if g.act] == ["silu", "silu"]
    gm = graph.program.graph_module

    def count(m, target):
        return sum(n.target is target for n in m.graph.nodes)

    cast, sigmoid = torch.ops.aten._to_copy.default, torch.ops.aten.sigmoid.default
    absorbed = 2 * 2 if dtype != torch.float32 else 0  # each layer's two casts
    assert count(gm, cast) - count(split, cast) == absorbed
    assert count(gm, sigmoid) == 2 and count(split, sigmoid) == 0
    torch.manual_seed(0)
    state = {s.name: torch.randn(s.shape).to(dtype) for s in lm.state}
    prefill = phase is Phase.PREFILL
    ids = torch.randint(0, 512, (1, 5) if prefill else (1, 1))
    user = {"input_ids": ids, "start": torch.tensor(0 if prefill else 9)}
    env = {**param_values(graph), **{k: v.clone() for k, v in state.items()}, **user}
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    with torch.no_grad():
        (want,) = gm(*[env[n] for n in names])
        (got,) = split(*bind({**{k: v.clone() for k, v in state.items()}, **user}))
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < 4 * torch.finfo(dtype).eps, float(err)  # a rounding or two of the dtype
