"""What the YAML schemas (the cluster file, the deploy config) share: quantities with units
as pydantic field types, and the one way a validation error is told to a person: one line
per problem, naming its key, with the closest valid value where one is near (difflib)."""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Iterable
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, PlainSerializer, ValidationError

from hetero.cluster.units import BANDWIDTH, DURATION, LATENCY, RATE, SIZE, Kind, UnitError, parse


def _read(kind: Kind, cast: type = float) -> BeforeValidator:
    def check(v: Any) -> Any:
        try:
            return cast(parse(v, kind))
        except UnitError as e:  # pydantic reports a ValueError under the field's key
            raise ValueError(str(e)) from None

    return BeforeValidator(check)


def _write(unit: str) -> PlainSerializer:
    """A quantity written back (JSON/YAML dumps: a job bundle's config) with its base unit,
    so that it reads again: a bare number is refused."""
    return PlainSerializer(lambda v: f"{v} {unit}", return_type=str, when_used="json")


Bytes = Annotated[float, _read(SIZE), _write("B")]  # "80 GB", "8 GiB"
ByteCount = Annotated[int, _read(SIZE, int), _write("B")]  # the same, as a whole number
Bandwidth = Annotated[float, _read(BANDWIDTH), _write("B/s")]  # "3.35 TB/s", "100 Gb/s"
Flops = Annotated[float, _read(RATE), _write("FLOPS")]  # "989 TFLOPS"
Seconds = Annotated[float, _read(LATENCY), _write("s")]  # "5 us": launch overheads, latencies
Duration = Annotated[float, _read(DURATION), _write("s")]  # "30 s": deadlines, grace periods


def did_you_mean(word: Any, choices: Iterable[Any]) -> str:
    """' (did you mean 'x'?)' for the choice closest to `word`, '' when none is close."""
    names = [str(c) for c in choices]
    close = difflib.get_close_matches(str(word), names, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def format_errors(
    source: str, what: str, e: ValidationError, model: type[BaseModel] | None = None
) -> str:
    """One line per problem, each naming its key: `<source>: the <what> is not valid:`.
    `model` (the schema validated) lets an unknown key suggest the closest known one."""
    lines = [f"{source}: the {what} is not valid:"]
    for err in e.errors():
        loc = tuple(err["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            known = _keys_at(model, loc[:-1]) if model is not None else ()
            msg = "unknown key" + (
                did_you_mean(loc[-1], known) or f" (known: {', '.join(known)})"
                if known
                else " (check its spelling)"
            )
        elif err["type"] == "missing":
            msg = "required key is missing"
        elif err["type"] in ("literal_error", "enum"):
            allowed = re.findall(r"'([^']*)'", str(err.get("ctx", {}).get("expected", "")))
            msg += did_you_mean(err.get("input"), allowed)
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)


def _keys_at(model: type[BaseModel], path: tuple[Any, ...]) -> tuple[str, ...]:
    """The field names of the sub-schema at `path` (keys and list indices) under `model`."""
    current: Any = model
    for part in path:
        if isinstance(part, int) or not _is_model(current):
            current = _inner(current)
        if _is_model(current) and isinstance(part, str):
            field = current.model_fields.get(part)
            if field is None:
                return ()
            current = field.annotation
    current = _inner(current)
    return tuple(current.model_fields) if _is_model(current) else ()


def _is_model(t: Any) -> bool:
    return isinstance(t, type) and issubclass(t, BaseModel)


def _inner(t: Any) -> Any:
    """The schema inside Optional[...], list[...], dict[..., ...]: the first model found."""
    if _is_model(t):
        return t
    origin = typing.get_origin(t)
    if origin is None and not isinstance(t, types.UnionType):
        return t
    for arg in reversed(typing.get_args(t)):  # dict[k, v]: the value's schema
        found = _inner(arg)
        if _is_model(found):
            return found
    return t
