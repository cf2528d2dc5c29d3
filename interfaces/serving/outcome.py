"""What a request came to, whichever protocol carried it: one status set, mapped once to gRPC
status codes and HTTP statuses, and the generation settings a request may carry."""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from hetero.errors import InvalidInput
from hetero.runtime.sampling import SEED_LIMIT


class Code(enum.Enum):
    """The answers hetero gives; each has one gRPC code and one HTTP status."""

    OK = (grpc.StatusCode.OK, 200)
    INVALID_ARGUMENT = (grpc.StatusCode.INVALID_ARGUMENT, 400)
    NOT_FOUND = (grpc.StatusCode.NOT_FOUND, 404)
    DEADLINE_EXCEEDED = (grpc.StatusCode.DEADLINE_EXCEEDED, 504)
    # 429: the client may retry later; 413 is reserved for bodies over max_message_bytes
    RESOURCE_EXHAUSTED = (grpc.StatusCode.RESOURCE_EXHAUSTED, 429)
    UNAVAILABLE = (grpc.StatusCode.UNAVAILABLE, 503)
    INTERNAL = (grpc.StatusCode.INTERNAL, 500)
    CANCELLED = (grpc.StatusCode.CANCELLED, 499)  # the client went away (nginx's 499)

    @property
    def grpc(self) -> grpc.StatusCode:
        return self.value[0]

    @property
    def http(self) -> int:
        return self.value[1]


@dataclass(frozen=True)
class Outcome:
    """A finished request: its code, the message for the caller, and (on success) the
    outputs and the time the model took."""

    code: Code
    message: str = ""
    outputs: dict[str, torch.Tensor] | None = None
    ms: float = 0.0

    @property
    def ok(self) -> bool:
        return self.code is Code.OK


@dataclass(frozen=True)
class GenerationSettings:
    """How one request generates: transformers' names and meanings (greedy by default)."""

    max_new_tokens: int
    eos_token_id: tuple[int, ...] = ()
    temperature: float = 0.0
    top_k: int = 0
    seed: int | None = None

    KEYS = ("max_new_tokens", "eos_token_id", "temperature", "top_k", "seed")

    @classmethod
    def parse(cls, params: Mapping[str, Any], default_max_new_tokens: int) -> GenerationSettings:
        """From a request's parameters (OIP `parameters`, a JSON body's keys); InvalidInput
        names the parameter and what it takes."""
        max_new = params.get("max_new_tokens")
        max_new = default_max_new_tokens if max_new is None else max_new  # 0 is an error
        eos = params.get("eos_token_id", ())
        eos = (eos,) if isinstance(eos, int | float) and not isinstance(eos, bool) else eos
        seed = params.get("seed")
        return cls(
            max_new_tokens=_int("max_new_tokens", max_new, low=1),
            eos_token_id=tuple(_int("eos_token_id", e, low=0) for e in _list("eos_token_id", eos)),
            temperature=_float("temperature", params.get("temperature", 0.0)),
            top_k=_int("top_k", params.get("top_k", 0), low=0),
            seed=None if seed is None else _int("seed", seed, low=0, high=SEED_LIMIT - 1),
        )

    def stream_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for CompiledLM.stream after the prompt."""
        return {
            "max_new_tokens": self.max_new_tokens,
            "eos_token_id": list(self.eos_token_id) or None,
            "temperature": self.temperature,
            "top_k": self.top_k,
            "seed": self.seed,
        }


def _int(key: str, value: Any, low: int, high: int | None = None) -> int:
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:  # a float's inf and NaN are not integers
        raise InvalidInput(f"parameter {key!r}: {value!r} is not an integer")
    if int(value) < low:
        raise InvalidInput(f"parameter {key!r}: {int(value)} is below {low}")
    if high is not None and int(value) > high:
        raise InvalidInput(f"parameter {key!r}: {int(value)} is above {high}")
    return int(value)


def _float(key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"parameter {key!r}: {value!r} is not a finite number")
    if value < 0:
        raise InvalidInput(f"parameter {key!r}: {value} is negative; 0 means greedy")
    return float(value)


def _list(key: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise InvalidInput(f"parameter {key!r}: expected a token id or a list of them")
    return list(value)
