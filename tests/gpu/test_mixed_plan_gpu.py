"""A model that lives on the GPU, planned over the GPU and its host CPU: the CPU partitions
get host copies of their weights, constants and examples, and the whole matches eager.

Skipped where CUDA is absent. Run: pytest tests/gpu.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

ROOT = Path(__file__).resolve().parents[2]


def test_cpu_partition_of_a_cuda_model(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    import hetero
    from hetero.cluster.spec import ClusterSpec

    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128, use_cache=False,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval().cuda()
    ids = torch.randint(0, 128, (2, 16), device="cuda")
    cluster = ClusterSpec.from_yaml(ROOT / "configs/clusters/h100-sxm-node.yaml")
    cpu = next(d.name for d in cluster.devices if d.kind == "cpu")
    with hetero.compile(
        model, (ids,), cluster, backends={"gpu": "eager", "cpu": "eager"}, cache_dir=tmp_path,
        executor="local", pins={"model.layers.1": cpu},
    ) as cm:  # fmt: skip
        assert {p.device for p in cm.plan.partitions} >= {cpu}
        with torch.no_grad():
            got, want = cm(ids), model(ids).logits
        got = got[0] if isinstance(got, tuple | list) else getattr(got, "logits", got)
        assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-3
