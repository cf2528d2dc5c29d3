"""capture(): op metadata, FLOPs against hand computation, dynamic shapes, clear errors."""

from __future__ import annotations

import pytest
import torch
from torch.export import Dim

from hetero.errors import CaptureError
from hetero.partitioner import capture


def _only(graph, target: str):
    nodes = [n for n in graph if n.target == target]
    assert len(nodes) == 1, [n.target for n in graph]
    return nodes[0]


class _Op(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, *xs):
        return self.fn(*xs)


@pytest.mark.parametrize(
    ("fn", "shapes", "target", "flops"),
    [
        (torch.mm, [(8, 16), (16, 32)], "aten.mm.default", 2 * 8 * 16 * 32),
        (
            lambda a, b: torch.bmm(a, b),
            [(3, 8, 16), (3, 16, 4)],
            "aten.bmm.default",
            2 * 3 * 8 * 16 * 4,
        ),
        (lambda a: a * 2.0, [(5, 7)], "aten.mul.Tensor", 35),
        (lambda a, b: a + b, [(4, 6), (4, 6)], "aten.add.Tensor", 24),
        (lambda a: a.sum(dim=1), [(6, 10)], "aten.sum.dim_IntList", 60),
        (lambda a: a.amax(dim=-1), [(3, 9)], "aten.amax.default", 27),
    ],
)
def test_flops_match_hand_computation(fn, shapes, target, flops):
    g = capture(_Op(fn), tuple(torch.randn(*s) for s in shapes))
    assert _only(g, target).flops == flops


def test_addmm_counts_the_matmul():
    lin = torch.nn.Linear(16, 32)
    g = capture(lin, (torch.randn(8, 16),))
    node = _only(g, "aten.addmm.default")
    assert node.flops == 2 * 8 * 16 * 32
    assert node.param_bytes == (16 * 32 + 32) * 4
    assert node.bytes_written == 8 * 32 * 4


def test_conv_flops():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    g = capture(conv, (torch.randn(2, 3, 10, 10),))
    node = _only(g, "aten.convolution.default")
    assert node.op_class == "conv"
    assert node.flops == 2 * (2 * 8 * 10 * 10) * 3 * 3 * 3


def test_sdpa_is_one_node_with_flops():
    fn = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # noqa: E731
    b, h, s, d = 2, 4, 16, 8
    g = capture(_Op(fn), tuple(torch.randn(b, h, s, d) for _ in range(3)))
    node = _only(g, "aten.scaled_dot_product_attention.default")
    assert node.op_class == "attention"
    assert node.flops == 2 * (2 * b * h * s * s * d)  # QK^T and PV


def test_layer_norm_and_softmax_conventions():
    g = capture(torch.nn.LayerNorm(16), (torch.randn(4, 16),))
    assert _only(g, "aten.native_layer_norm.default").flops == 5 * 64
    g = capture(_Op(lambda a: torch.softmax(a, dim=-1)), (torch.randn(4, 16),))
    assert _only(g, "aten._softmax.default").flops == 4 * 64


def test_views_move_nothing(tiny_gpt):
    g = capture(*tiny_gpt)
    views = [n for n in g if n.op_class == "view"]
    assert views and all(
        n.bytes_read == n.bytes_written == n.flops == n.launches == 0 for n in views
    )


@pytest.mark.parametrize("name", ["tiny_gpt", "mlp", "gpt2", "bert"])
def test_capture_models(name, request):
    model, inputs = request.getfixturevalue(name)
    g = capture(model, inputs)
    assert len(g) > 0 and g.total_flops > 0
    assert g.graph.number_of_nodes() == len(g)
    assert list(g.inputs) and g.outputs
    # every edge carries the producer's bytes; every node has meta for its outputs
    for _, _, data in g.graph.edges(data=True):
        assert data["bytes"] >= 0
    assert all(n.out_meta for n in g)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert g.param_bytes >= params * 0.5  # tied weights are counted once
    mods = g.module_summary(depth=1)
    assert sum(r["flops"] for r in mods) == g.total_flops


def test_module_stack_and_coarsening(gpt2):
    g = capture(*gpt2)
    mlp = [n for n in g if n.module.startswith("h.0.mlp")]
    assert mlp and mlp[0].module_at(1) == "h.0"
    coarse = g.coarsen()
    assert 1 < len(coarse) <= 64
    assert sum(len(gr.nodes) for gr in coarse) == len(g)
    import networkx as nx

    assert nx.is_directed_acyclic_graph(coarse.graph)
    blocks = g.coarsen(depth=1)
    assert any(gr.module == "h.1" for gr in blocks)
    finer = blocks.refine(next(gr.name for gr in blocks if gr.module == "h.1"))
    assert len(finer) > len(blocks)
    assert sum(gr.flops for gr in finer) == g.total_flops


def test_dynamic_batch_and_sequence(gpt2):
    model, (x,) = gpt2
    batch, seq = Dim("batch", min=1, max=32), Dim("seq", min=2, max=64)
    g = capture(model, (x,), dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    meta = g.inputs["input_ids"]
    assert meta.dynamic and all(isinstance(s, str) for s in meta.shape)
    assert meta.hint == tuple(x.shape)
    assert g.dynamic and g.total_flops > 0
    out = g.program.module()(torch.randint(0, 128, (3, 9)))
    ref = model(torch.randint(0, 128, (3, 9)))
    assert out[0].shape == ref[0].shape


def test_describing_ops_does_not_specialize_dynamic_dims():
    """Counting FLOPs of a tuple-returning op (native_layer_norm) once did arithmetic on its
    symbolic sizes, which pinned the dynamic length to the example's in the program's
    ShapeEnv: every later export of a partition then refused other lengths."""
    from hetero.interfaces.models import tiny_gpt

    model, (idx,) = tiny_gpt(batch=2, seq=64)
    g = capture(model, (idx,), dynamic_shapes={"idx": {1: Dim("seq", min=2, max=128)}})
    ln = next(n for n in g.nodes.values() if "native_layer_norm" in n.target)
    assert any(isinstance(s, str) for s in ln.out_meta[0].shape)
    specialised = [
        n.name
        for n in g.program.graph.nodes
        if n.op == "call_function"
        and isinstance(n.meta.get("val"), torch.Tensor)
        and len(n.meta["val"].shape) == 3
        and str(n.meta["val"].shape[1]) == "64"
    ]
    assert not specialised


def test_uncapturable_model_gives_one_clear_error():
    class DataDependent(torch.nn.Module):
        def forward(self, x):
            if x.sum() > 0:  # Python control flow on a tensor's value
                return x * 2
            return x - 1

    with pytest.raises(CaptureError) as info:
        capture(DataDependent(), (torch.randn(4),))
    msg = str(info.value)
    assert "DataDependent" in msg and "What to do" in msg and "torch.cond" in msg
    # the user's file, line and source line come first, before torch's long message
    assert f"at {__file__}:" in msg.splitlines()[0]
    assert msg.splitlines()[1].strip().startswith("if x.sum() > 0:")


def test_a_capture_failure_is_reported_once(capfd):
    """torch logs a failed export and prints its partial graph; the CaptureError says it."""

    class Mismatch(torch.nn.Module):
        def forward(self, x):
            return x @ torch.ones(5, 3)

    with pytest.raises(CaptureError, match=r"(?s)in forward\n\s+return x @ torch.ones\(5, 3\)"):
        capture(Mismatch(), (torch.randn(4, 4),))
    err = capfd.readouterr().err
    assert "def forward" not in err and "Traceback" not in err, err


def test_a_bool_tensor_counts_its_bytes_and_a_python_bool_does_not():
    from hetero.partitioner.graph import tensor_meta

    mask = tensor_meta(torch.ones(4, 256, 256, dtype=torch.bool))
    assert mask.is_tensor and mask.nbytes == 4 * 256 * 256
    flag = tensor_meta(True)
    assert not flag.is_tensor and flag.nbytes == 8


def test_a_transformers_lm_with_its_cache_on_captures_as_a_forward():
    """A causal LM built from a config returns its KV cache (a DynamicCache) by default, which
    torch.export cannot return: capture turns the cache off and puts the config back."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32,
    )  # fmt: skip
    assert config.use_cache
    model = transformers.Qwen2ForCausalLM(config).eval()
    ids = torch.randint(0, 64, (1, 8))
    g = capture(model, (ids,))
    assert model.config.use_cache  # put back
    out = g.program.module()(ids)
    torch.testing.assert_close(out.logits, model(ids).logits)
    assert out.past_key_values is None


def test_an_output_torch_cannot_return_is_named_with_what_to_do():
    class Box:
        def __init__(self, t):
            self.t = t

    class ReturnsBox(torch.nn.Module):
        def forward(self, x):
            return Box(x + 1)

    with pytest.raises(CaptureError, match="register_pytree_node"):
        capture(ReturnsBox(), (torch.randn(3),))
