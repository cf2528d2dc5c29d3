"""The dtype a host CPU computes a 16-bit model's work in.

A CPU with AMX or AVX512-BF16 may read bfloat16 weights faster than float16 ones, or not:
on the H200 boxes' hosts, while the link copied, float16 rows ran at 44.3 and bfloat16 at
50.7 GB/s on one (llm_generate.md run 11) and 50.7 against 47.8 on another (run 13), so
only a measurement decides. The GPU keeps the
model's own dtype; the CPU may run bfloat16 copies (float16's exponent range is narrower,
so nothing overflows; 3 bits less mantissa: each product's rounding error ~4e-3 relative
instead of ~5e-4) or float32 copies (exact products of the 16-bit weights, twice the bytes).
The cost model chooses, by the rates it measured; the numbers are in README's generation
section. By default (`HostPrecision.MODEL`) no dtype with less mantissa than the model's is a
candidate: run 28 (an H100 host) read bfloat16 13% faster, took it past the margin below,
and its logits came out 3.5% off the GPU's. Under `HostPrecision.FASTEST` a dtype with less
mantissa than the model's must be priced `COARSER_MARGIN` faster to be taken: on an H200
host (run 15) bfloat16 was priced 8.6% faster than float16, and the 12 decoder layers the
plan then ran on the CPU in bfloat16 put the logits 3.6% off the GPU's (the goal is 2e-2);
the same plan in float16 loses those 8.6% on the CPU layers only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from hetero.cluster.spec import DeviceSpec
from hetero.partitioner.cost import CostModel
from hetero.partitioner.decisions import HostPrecision
from hetero.partitioner.graph import OpNode, TensorMeta, itemsize

SIXTEEN_BIT = ("float16", "bfloat16")
MANTISSA_BITS = {"float16": 10, "bfloat16": 7, "float32": 23}
COARSER_MARGIN = 0.10  # a coarser dtype must be priced this much faster than the model's


def preferred(own: str, priced: Sequence[tuple[str, float]]) -> str:
    """The dtype to compute in from (dtype, time) pairs: the fastest, unless it has less
    mantissa than `own` and is not `COARSER_MARGIN` faster than `own` itself."""
    if not priced:
        return own
    best, t = min(priced, key=lambda x: x[1])
    mine = dict(priced).get(own)
    coarser = MANTISSA_BITS.get(best, 99) < MANTISSA_BITS.get(own, 0)
    if coarser and mine is not None and t > mine * (1 - COARSER_MARGIN):
        return own
    return best


def candidates(
    own: str,
    device: DeviceSpec,
    cm: CostModel,
    op_class: str,
    backend: str | None,
    precision: HostPrecision = HostPrecision.MODEL,
) -> list[str]:
    """The dtypes `device` may compute a model of dtype `own` in: its own first, never below
    its size (a float32 model stays float32) and, under `HostPrecision.MODEL`, never with
    less mantissa (a float16 model's stay float16 or float32); once the profile measured
    some of them, only those (an unmeasured one is priced by a guess)."""
    coarser_ok = precision is HostPrecision.FASTEST
    found = [own] + [
        d
        for d in ("bfloat16", "float32")
        if d != own
        and d in device.dtypes
        and itemsize(d) >= itemsize(own)
        and (coarser_ok or MANTISSA_BITS.get(d, 99) >= MANTISSA_BITS.get(own, 0))
    ]
    measured = [d for d in found if cm.measured(device, op_class, d, backend)]
    return measured or found


def retyped(op: OpNode, dtype: str) -> OpNode:
    """`op` as it runs with its 16-bit float tensors in `dtype` (bytes scaled to match)."""
    own = op.dtype
    if own not in SIXTEEN_BIT or dtype == own:
        return op
    ratio = itemsize(dtype) / itemsize(own)

    def meta(ms: tuple[TensorMeta, ...]) -> tuple[TensorMeta, ...]:
        return tuple(
            dataclasses.replace(m, dtype=dtype) if m.dtype in SIXTEEN_BIT else m for m in ms
        )

    return dataclasses.replace(
        op,
        in_meta=meta(op.in_meta),
        out_meta=meta(op.out_meta),
        bytes_read=int(op.bytes_read * ratio),
        bytes_written=int(op.bytes_written * ratio),
        param_bytes=int(op.param_bytes * ratio),
    )


@dataclasses.dataclass(frozen=True)
class HostDtype:
    """The decision for one host CPU: `dtype` ('' = the model's own) and the priced times
    (ms of the ops it was chosen on, per candidate) that chose it."""

    device: str
    dtype: str
    priced_ms: tuple[tuple[str, float], ...]

    def note(self) -> str:
        times = ", ".join(f"{d} {ms:.2f} ms" for d, ms in self.priced_ms)
        if not self.dtype:
            return f"{self.device} computes in the model's own dtype ({times})"
        return (
            f"{self.device} computes in {self.dtype} copies of the weights it holds (its "
            f"matmuls priced {times})"
        )


def choose(
    ops: Sequence[OpNode],
    device: DeviceSpec,
    cm: CostModel,
    backend: str,
    precision: HostPrecision = HostPrecision.MODEL,
) -> HostDtype:
    """The fastest dtype for `ops` (a phase's whole graph) on the CPU `device`, priced by the
    cost model on their matmuls (where a decode step's time goes)."""
    mms = [op for op in ops if op.op_class == "matmul"]
    # the model's dtype: the one most weight bytes are read in (a rotary embedding's
    # float32 position product is a matmul too, and may come first)
    weight: dict[str, int] = {}
    for op in mms:
        weight[op.dtype] = weight.get(op.dtype, 0) + op.param_bytes
    own = max(weight, key=weight.__getitem__) if weight else ""
    if own not in SIXTEEN_BIT or device.kind != "cpu":
        return HostDtype(device.name, "", ())
    priced = []
    for dtype in candidates(own, device, cm, "matmul", backend, precision):
        t = sum(
            cm.op_time(retyped(op, dtype), device, 1.0, backend) for op in mms if op.dtype == own
        )
        priced.append((dtype, 1e3 * t))
    best = preferred(own, priced)
    return HostDtype(device.name, "" if best == own else best, tuple(priced))
