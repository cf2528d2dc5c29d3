"""The Open Inference Protocol's tensors and descriptions, protocol-side: datatypes, tensors
from a gRPC ModelInferRequest or an HTTP/JSON body (with the binary tensor data extension),
answers in both forms, and model/server metadata. What a request may hold is checked by the
same Contract as every other way in (interfaces/validation.py)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from importlib import metadata
from typing import Any

import numpy as np
import torch

from hetero.errors import InvalidInput
from hetero.interfaces import grpc_predict_v2_pb2 as oip
from hetero.interfaces.validation import Contract
from hetero.partitioner.graph import TensorMeta

PLATFORM = "hetero"
VERSION = "1"  # one version of one model per server
# Header of the binary tensor data extension: the JSON part's length, the tensors' bytes after.
HEADER_LENGTH = "Inference-Header-Content-Length"

DATATYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "UINT8": torch.uint8,
    "INT8": torch.int8,
    "INT16": torch.int16,
    "INT32": torch.int32,
    "INT64": torch.int64,
    "FP16": torch.float16,
    "BF16": torch.bfloat16,
    "FP32": torch.float32,
    "FP64": torch.float64,
}
_NAMES = {dtype: name for name, dtype in DATATYPES.items()}
# The typed list of InferTensorContents each datatype travels in (FP16 and BF16 have none:
# their elements travel as raw bytes only).
_CONTENTS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
}


def datatype(meta_dtype: str) -> str:
    """The OIP datatype of a torch dtype name ("float32" -> "FP32"); BYTES for other kinds."""
    dtype = getattr(torch, meta_dtype, None)
    return _NAMES.get(dtype, "BYTES") if isinstance(dtype, torch.dtype) else "BYTES"


def _dtype(name: str, dtype_name: str) -> torch.dtype:
    try:
        return DATATYPES[dtype_name]
    except KeyError:
        raise InvalidInput(
            f"input {name!r}: datatype {dtype_name or '(empty)'!r} is not served here; one of "
            f"{', '.join(DATATYPES)}"
        ) from None


def _shape(name: str, shape: Iterable[Any]) -> tuple[int, ...]:
    dims = list(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in dims):
        raise InvalidInput(f"input {name!r}: shape {dims} must be a list of integers")
    if any(d < 0 for d in dims):
        raise InvalidInput(f"input {name!r}: shape {dims} has a negative dim")
    return tuple(dims)


def from_bytes(name: str, dtype: torch.dtype, shape: tuple[int, ...], data: bytes) -> torch.Tensor:
    """A tensor in torch-allocated (aligned) memory holding `data`, after checking its size."""
    count = math.prod(shape)
    want = count * dtype.itemsize
    if len(data) != want:
        raise InvalidInput(
            f"input {name!r}: {len(data)} bytes of data; {_NAMES[dtype]}{list(shape)} needs "
            f"{want} ({count} x {dtype.itemsize} bytes, row-major, little-endian)"
        )
    out = torch.empty(shape, dtype=dtype)
    if want:
        out.view(-1).view(torch.uint8).numpy()[:] = np.frombuffer(data, dtype=np.uint8)
    return out


def from_values(
    name: str, dtype: torch.dtype, shape: tuple[int, ...], values: list[Any]
) -> torch.Tensor:
    """A tensor from a flat list of elements (JSON `data`, gRPC typed contents), checking
    count, kind and range."""
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input {name!r}: {len(values)} elements; shape {list(shape)} needs {count}"
        )
    if dtype == torch.bool:
        if not all(isinstance(v, bool) for v in values):
            raise InvalidInput(f"input {name!r}: a BOOL tensor holds true/false only")
        return torch.tensor(values, dtype=torch.bool).reshape(shape)
    if dtype.is_floating_point:
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            raise InvalidInput(f"input {name!r}: a {_NAMES[dtype]} tensor holds numbers only")
        return torch.tensor(values, dtype=torch.float64).to(dtype).reshape(shape)
    bad = next(
        (i for i, v in enumerate(values) if not isinstance(v, int) or isinstance(v, bool)), None
    )
    if bad is not None:
        raise InvalidInput(
            f"input {name!r}: element {bad} is {values[bad]!r}; a {_NAMES[dtype]} tensor holds "
            "integers only"
        )
    info = torch.iinfo(dtype)
    bad = next((i for i, v in enumerate(values) if not info.min <= v <= info.max), None)
    if bad is not None:
        raise InvalidInput(
            f"input {name!r}: element {bad} is {values[bad]}, outside {_NAMES[dtype]}'s range "
            f"[{info.min}, {info.max}]"
        )
    return torch.tensor(values, dtype=dtype).reshape(shape)


def _named(inputs: Iterable[tuple[str, Any]], contract: Contract) -> dict[str, Any]:
    given: dict[str, Any] = {}
    for name, item in inputs:
        if name in given:
            raise InvalidInput(f"input {name!r} is given twice")
        given[name] = item
    contract.check_names(given)
    return given


# ---- gRPC ----------------------------------------------------------------------------------------


def grpc_inputs(request: oip.ModelInferRequest, contract: Contract) -> dict[str, torch.Tensor]:
    """The request's tensors (raw_input_contents or typed contents), checked on the wire and
    then against the contract."""
    raw = list(request.raw_input_contents)
    if raw and len(raw) != len(request.inputs):
        raise InvalidInput(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give "
            "one per input, in the order of `inputs`"
        )
    given = _named(
        ((t.name, (t, raw[i] if raw else None)) for i, t in enumerate(request.inputs)), contract
    )
    out = {}
    for name, (t, data) in given.items():
        dtype = _dtype(name, t.datatype)
        shape = _shape(name, t.shape)
        if data is not None:
            out[name] = from_bytes(name, dtype, shape, data)
            continue
        field = _CONTENTS.get(t.datatype)
        if field is None:
            raise InvalidInput(
                f"input {name!r}: {t.datatype} elements travel in raw_input_contents only"
            )
        out[name] = from_values(name, dtype, shape, list(getattr(t.contents, field)))
    contract.check(out)
    return out


def grpc_parameters(params: Mapping[str, oip.InferParameter]) -> dict[str, Any]:
    """A request's parameters as Python values."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        which = p.WhichOneof("parameter_choice")
        out[key] = getattr(p, which) if which else None
    return out


def grpc_answer(
    request: oip.ModelInferRequest, model: str, outputs: Mapping[str, torch.Tensor]
) -> oip.ModelInferResponse:
    """Outputs as raw bytes (what tritonclient and the KServe client read fastest)."""
    wanted = requested([o.name for o in request.outputs], outputs)
    response = oip.ModelInferResponse(model_name=model, model_version=VERSION, id=request.id)
    for name in wanted:
        t = _wire(name, outputs[name])
        response.outputs.add(name=name, datatype=_NAMES[t.dtype], shape=list(t.shape))
        response.raw_output_contents.append(_bytes(t))
    return response


def requested(names: list[str], outputs: Mapping[str, torch.Tensor]) -> list[str]:
    """The outputs a request asked for (all when it named none); InvalidInput for others."""
    if not names:
        return list(outputs)
    unknown = [n for n in names if n not in outputs]
    if unknown:
        raise InvalidInput(
            f"unknown output {', '.join(map(repr, unknown))}; the model's outputs are "
            f"{', '.join(map(repr, outputs))}"
        )
    return names


def _wire(name: str, t: torch.Tensor) -> torch.Tensor:
    t = t.detach().to("cpu").contiguous()
    if t.dtype not in _NAMES:
        raise InvalidInput(f"output {name!r} has dtype {t.dtype}, which has no OIP datatype")
    return t


def _bytes(t: torch.Tensor) -> bytes:
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _values(t: torch.Tensor) -> list[Any]:
    flat = t.reshape(-1)
    if t.dtype in (torch.float16, torch.bfloat16):
        flat = flat.to(torch.float32)
    return flat.tolist()


# ---- HTTP/REST -----------------------------------------------------------------------------------


def split_body(body: bytes, header_length: str | None) -> tuple[dict[str, Any], bytes]:
    """The JSON part of a request body and the binary tensor data after it."""
    if header_length is None:
        head, rest = body, b""
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise InvalidInput(f"{HEADER_LENGTH}: {header_length!r} is not a byte count") from None
        if not 0 <= n <= len(body):
            raise InvalidInput(f"{HEADER_LENGTH}: {n} is outside the body's {len(body)} bytes")
        head, rest = body[:n], body[n:]
    try:
        request = json.loads(head)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidInput(f"the request body is not JSON: {e}") from None
    if not isinstance(request, dict):
        raise InvalidInput("the request body must be a JSON object")
    return request, rest


def json_inputs(
    request: Mapping[str, Any], binary: bytes, contract: Contract
) -> dict[str, torch.Tensor]:
    """Tensors from a JSON inference request: `data` (flat or nested lists) or, with the
    binary tensor data extension, `parameters.binary_data_size` bytes each, in order."""
    inputs = request.get("inputs")
    if not isinstance(inputs, list) or not all(isinstance(i, dict) for i in inputs):
        raise InvalidInput("`inputs` must be a list of tensors ({name, shape, datatype, data})")
    _named(((str(i.get("name", "")), i) for i in inputs), contract)
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for i in inputs:  # binary parts follow the order of `inputs`
        name = str(i.get("name", ""))
        dtype = _dtype(name, str(i.get("datatype", "")))
        shape = i.get("shape")
        if not isinstance(shape, list):
            raise InvalidInput(f"input {name!r}: `shape` must be a list of integers")
        shape = _shape(name, shape)
        size = (i.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            if not isinstance(size, int) or size < 0 or offset + size > len(binary):
                raise InvalidInput(
                    f"input {name!r}: binary_data_size {size!r} does not fit the "
                    f"{len(binary) - offset} bytes left after the JSON header"
                )
            out[name] = from_bytes(name, dtype, shape, binary[offset : offset + size])
            offset += size
        elif "data" in i:
            out[name] = from_values(name, dtype, shape, _flatten(i["data"]))
        else:
            raise InvalidInput(f"input {name!r} has no `data` (nor binary_data_size)")
    if offset != len(binary):
        raise InvalidInput(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    contract.check(out)
    return out


def _flatten(data: Any) -> list[Any]:
    if not isinstance(data, list):
        return [data]
    out: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            out.append(item)
        else:
            stack.pop()
    return out


def json_answer(
    request: Mapping[str, Any], model: str, outputs: Mapping[str, torch.Tensor]
) -> tuple[bytes, dict[str, str]]:
    """The response body and headers: JSON `data`, or binary parts where the request asked
    (an output's `parameters.binary_data`, else the request's `binary_data_output`)."""
    asked = request.get("outputs") or []
    if not isinstance(asked, list) or not all(isinstance(o, dict) for o in asked):
        raise InvalidInput("`outputs` must be a list of {name, parameters}")
    by_name = {str(o.get("name", "")): o for o in asked}
    default = bool((request.get("parameters") or {}).get("binary_data_output", False))
    blobs: list[bytes] = []
    tensors = []
    for name in requested(list(by_name), outputs):
        t = _wire(name, outputs[name])
        entry: dict[str, Any] = {"name": name, "datatype": _NAMES[t.dtype], "shape": list(t.shape)}
        binary = (by_name.get(name, {}).get("parameters") or {}).get("binary_data", default)
        if binary:
            data = _bytes(t)
            entry["parameters"] = {"binary_data_size": len(data)}
            blobs.append(data)
        else:
            entry["data"] = _values(t)
        tensors.append(entry)
    body: dict[str, Any] = {"model_name": model, "model_version": VERSION, "outputs": tensors}
    if "id" in request:
        body["id"] = request["id"]
    head = json.dumps(body, separators=(",", ":")).encode()
    if not blobs:
        return head, {"Content-Type": "application/json"}
    return head + b"".join(blobs), {
        "Content-Type": "application/octet-stream",
        HEADER_LENGTH: str(len(head)),
    }


# ---- metadata ------------------------------------------------------------------------------------


def tensor_metadata(metas: Mapping[str, TensorMeta]) -> list[dict[str, Any]]:
    """name, datatype and shape (-1 where a dim's size varies) per tensor."""
    return [
        {
            "name": name,
            "datatype": datatype(meta.dtype),
            "shape": [d if isinstance(d, int) else -1 for d in meta.shape],
        }
        for name, meta in metas.items()
    ]


def model_metadata(name: str, servable: Any) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [VERSION],
        "platform": PLATFORM,
        "inputs": tensor_metadata(servable.input_metas),
        "outputs": tensor_metadata(getattr(servable, "output_metas", {})),
    }


def server_metadata(generative: bool) -> dict[str, Any]:
    try:
        version = metadata.version("hetero")
    except metadata.PackageNotFoundError:
        version = "unknown"
    extensions = ["binary_tensor_data"] + (["generate"] if generative else [])
    return {"name": "hetero", "version": version, "extensions": extensions}
