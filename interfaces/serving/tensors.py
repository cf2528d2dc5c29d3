"""Named tensors on the wire: torch <-> hetero.v1.Tensor. What a request may hold is checked
by interfaces/validation.py, shared with every other way in."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np
import torch

from hetero.errors import InvalidInput
from hetero.interfaces import hetero_pb2 as pb
from hetero.interfaces.validation import Contract
from hetero.partitioner.graph import TensorMeta

__all__ = ["WIRE_DTYPES", "InvalidInput", "decode_inputs", "from_proto", "meta_info", "to_proto"]

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


def decode_tensor(msg: pb.Tensor) -> torch.Tensor:
    """One wire tensor as a torch tensor, after checking its dtype, shape and byte count."""
    name = msg.name
    if msg.dtype not in WIRE_DTYPES:
        raise InvalidInput(
            f"input {name!r}: dtype {msg.dtype or '(empty)'!r} has no wire form; one of "
            f"{', '.join(WIRE_DTYPES)}"
        )
    shape = tuple(int(s) for s in msg.shape)
    if any(s < 0 for s in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dim")
    itemsize = WIRE_DTYPES[msg.dtype].itemsize
    want_bytes = itemsize * math.prod(shape)
    if len(msg.data) != want_bytes:
        raise InvalidInput(
            f"input {name!r}: {len(msg.data)} bytes of data; {msg.dtype}{list(shape)} needs "
            f"{want_bytes} ({math.prod(shape)} x {itemsize} bytes, row-major)"
        )
    return from_proto(msg)


def decode_inputs(
    tensors: Iterable[pb.Tensor], expected: Contract | Mapping[str, TensorMeta]
) -> dict[str, torch.Tensor]:
    """The request's tensors, checked on the wire (dtype, shape, bytes) and then against the
    model's contract (names, dtypes, shapes, dim ranges, values: interfaces/validation.py)."""
    contract = expected if isinstance(expected, Contract) else Contract.from_metas(expected)
    given: dict[str, pb.Tensor] = {}
    for t in tensors:
        if t.name in given:
            raise InvalidInput(f"input {t.name!r} is given twice")
        given[t.name] = t
    contract.check_names(given)
    out = {name: decode_tensor(t) for name, t in given.items()}
    contract.check(out)
    return out


def meta_info(name: str, meta: TensorMeta) -> pb.TensorInfo:
    return pb.TensorInfo(
        name=name,
        dtype=meta.dtype,
        shape=[str(s) for s in meta.shape],
        example_shape=list(meta.hint),
    )
