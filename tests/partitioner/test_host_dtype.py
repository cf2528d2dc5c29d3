"""The host CPU's compute dtype: chosen by the priced rates, over the model's own matmuls."""

from __future__ import annotations

import dataclasses

import torch
from llm_models import captured_llama

from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency
from hetero.cluster.spec import ClusterSpec
from hetero.partitioner import host_dtype
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import HostPrecision


def _cm() -> CostModel:
    rates = (Efficiency("matmul/float16", 0.3, 0.3), Efficiency("matmul/bfloat16", 0.6, 0.6))
    device = DeviceProfile("box/cpu", "cpu", efficiency=rates, backend="eager")
    return CostModel(profile=CalibrationProfile(cluster="cpu-2core", devices=(device,)))


def test_a_float32_matmul_without_weights_does_not_decide_the_models_dtype():
    """transformers' rotary embedding multiplies positions by frequencies in float32; some
    versions export it as a matmul ahead of the first layer's."""
    ops = list(captured_llama(torch.float16).decode)
    mm = next(op for op in ops if op.op_class == "matmul")
    f32 = [dataclasses.replace(m, dtype="float32") for m in mm.out_meta]
    rotary = dataclasses.replace(mm, name="rotary_mm", out_meta=tuple(f32), param_bytes=0)
    cpu = ClusterSpec.from_yaml("configs/clusters/cpu-2core.yaml").device("box/cpu")
    chosen = host_dtype.choose([rotary, *ops], cpu, _cm(), "eager", HostPrecision.FASTEST)
    assert chosen.dtype == "bfloat16"
    assert chosen.priced_ms[0][0] == "float16"  # the model's own, first


def test_by_default_a_float16_model_never_computes_in_bfloat16_copies():
    """HostPrecision.MODEL (the default): bfloat16 read twice as fast is still not taken, its
    3 bits less mantissa cost run 28 3.5% of the logits (goal 2%); float32 copies still may."""
    ops = list(captured_llama(torch.float16).decode)
    cpu = ClusterSpec.from_yaml("configs/clusters/cpu-2core.yaml").device("box/cpu")
    chosen = host_dtype.choose(ops, cpu, _cm(), "eager")
    assert chosen.dtype == ""  # the model's own
    assert "bfloat16" not in dict(chosen.priced_ms)
    # the measured ones only (float32 was not measured here)
    assert host_dtype.candidates("float16", cpu, _cm(), "matmul", "eager") == ["float16"]
    assert "bfloat16" in host_dtype.candidates(
        "float16", cpu, _cm(), "matmul", "eager", HostPrecision.FASTEST
    )


def test_retyped_ops_keep_their_other_dtypes_and_scale_bytes():
    ops = list(captured_llama(torch.float16).decode)
    mm = next(op for op in ops if op.op_class == "matmul" and op.param_bytes)
    as32 = host_dtype.retyped(mm, "float32")
    assert as32.dtype == "float32" and as32.param_bytes == 2 * mm.param_bytes
    assert host_dtype.retyped(mm, "bfloat16").param_bytes == mm.param_bytes
    ints = next(op for op in ops if op.dtype == "int64")
    assert host_dtype.retyped(ints, "bfloat16") is ints


def test_a_coarser_dtype_must_be_clearly_faster():
    """bfloat16 copies of a float16 model lose 3 bits of every product: taken only when
    priced at least COARSER_MARGIN faster (run 15: 8.6% faster cost 3.6% of the logits)."""
    margin = host_dtype.COARSER_MARGIN
    near = [("float16", 100.0), ("bfloat16", 100.0 * (1 - margin / 2)), ("float32", 150.0)]
    assert host_dtype.preferred("float16", near) == "float16"
    far = [("float16", 100.0), ("bfloat16", 100.0 * (1 - 2 * margin))]
    assert host_dtype.preferred("float16", far) == "bfloat16"
    # more mantissa needs no margin
    assert host_dtype.preferred("float16", [("float16", 100.0), ("float32", 99.0)]) == "float32"
