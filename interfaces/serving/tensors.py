"""Named tensors on the wire: torch <-> hetero.v1.Tensor, and checks against the model's inputs."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

from hetero.interfaces import hetero_pb2 as pb
from hetero.partitioner.graph import TensorMeta

WIRE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}


class InvalidInput(ValueError):
    """A request's tensors do not match the model's inputs (the message names the input)."""


def to_proto(name: str, t: torch.Tensor) -> pb.Tensor:
    t = t.detach().to("cpu").contiguous()
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype not in WIRE_DTYPES:
        raise InvalidInput(f"output {name!r} has dtype {dtype}, which has no wire form")
    data = t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return pb.Tensor(name=name, dtype=dtype, shape=list(t.shape), data=data)


def from_proto(msg: pb.Tensor) -> torch.Tensor:
    """A tensor that owns torch-allocated (64-byte aligned) memory holding the message's bytes.

    Copying into torch's allocation, rather than viewing the message's buffer, keeps the
    alignment that compiled kernels (TVM via DLPack) require.
    """
    out = torch.empty(tuple(msg.shape), dtype=WIRE_DTYPES[msg.dtype])
    if msg.data:
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(msg.data, dtype=np.uint8)
    return out


def _expected(meta: TensorMeta) -> str:
    return f"{meta.dtype}[{', '.join(str(s) for s in meta.shape)}]"


def decode_inputs(
    tensors: Iterable[pb.Tensor], expected: Mapping[str, TensorMeta]
) -> dict[str, torch.Tensor]:
    """Check every input against the model's metas (name, dtype, rank, sizes, byte count)."""
    given: dict[str, pb.Tensor] = {}
    for t in tensors:
        if t.name in given:
            raise InvalidInput(f"input {t.name!r} is given twice")
        given[t.name] = t
    summary = ", ".join(f"{n} ({_expected(m)})" for n, m in expected.items())
    missing = [n for n in expected if n not in given]
    if missing:
        raise InvalidInput(f"missing input {', '.join(map(repr, missing))}; expected: {summary}")
    extra = [n for n in given if n not in expected]
    if extra:
        raise InvalidInput(f"unknown input {', '.join(map(repr, extra))}; expected: {summary}")
    bound: dict[str, tuple[int, str]] = {}  # dynamic dim symbol -> (size, input that set it)
    out: dict[str, torch.Tensor] = {}
    for name, meta in expected.items():
        t = given[name]
        if meta.dtype not in WIRE_DTYPES:
            raise InvalidInput(
                f"input {name!r}: the model takes {meta.dtype}, which has no wire form"
            )
        if t.dtype != meta.dtype:
            raise InvalidInput(
                f"input {name!r}: dtype {t.dtype or '(empty)'} but the model expects {meta.dtype} "
                f"({_expected(meta)})"
            )
        shape = tuple(int(s) for s in t.shape)
        if len(shape) != len(meta.shape):
            raise InvalidInput(
                f"input {name!r}: shape {list(shape)} has {len(shape)} dims; expected "
                f"{_expected(meta)}"
            )
        for axis, (got, want) in enumerate(zip(shape, meta.shape, strict=True)):
            if isinstance(want, int):
                if got != want:
                    raise InvalidInput(
                        f"input {name!r}: dim {axis} is {got}; expected {want} "
                        f"(shape {list(shape)} vs {_expected(meta)})"
                    )
            elif got < 0:
                raise InvalidInput(f"input {name!r}: dim {axis} is negative ({got})")
            elif want in bound and bound[want][0] != got:
                size, other = bound[want]
                raise InvalidInput(
                    f"input {name!r}: dim {axis} ({want}) is {got} but {other!r} set {want}={size}"
                )
            else:
                bound.setdefault(want, (got, name))
        itemsize = WIRE_DTYPES[meta.dtype].itemsize
        want_bytes = itemsize * _numel(shape)
        if len(t.data) != want_bytes:
            raise InvalidInput(
                f"input {name!r}: {len(t.data)} bytes of data; {meta.dtype}{list(shape)} needs "
                f"{want_bytes} ({_numel(shape)} x {itemsize} bytes, row-major)"
            )
        out[name] = from_proto(t)
    return out


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def meta_info(name: str, meta: TensorMeta) -> pb.TensorInfo:
    return pb.TensorInfo(
        name=name,
        dtype=meta.dtype,
        shape=[str(s) for s in meta.shape],
        example_shape=list(meta.hint),
    )
