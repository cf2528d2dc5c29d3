"""What the YAML schemas (the cluster file, the deploy config) share: quantities with units
as pydantic field types, and the one way a validation error is told to a person."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import BeforeValidator, ValidationError

from hetero.cluster.units import (
    UnitError,
    parse_bandwidth,
    parse_bytes,
    parse_flops,
    parse_seconds,
)


def _read(parser: Callable[[Any], float], cast: type = float) -> BeforeValidator:
    def check(v: Any) -> Any:
        try:
            return cast(parser(v))
        except UnitError as e:  # pydantic reports a ValueError under the field's key
            raise ValueError(str(e)) from None

    return BeforeValidator(check)


Bytes = Annotated[float, _read(parse_bytes)]  # "80 GB", "8 GiB" or a number of bytes
ByteCount = Annotated[int, _read(parse_bytes, int)]  # the same, as a whole number
Bandwidth = Annotated[float, _read(parse_bandwidth)]  # "3.35 TB/s" or bytes per second
Flops = Annotated[float, _read(parse_flops)]  # "989 TFLOPS" or FLOP/s
Seconds = Annotated[float, _read(parse_seconds)]  # "5 us", "30 s" or seconds


def format_errors(source: str, what: str, e: ValidationError) -> str:
    """One line per problem, each naming its key: `<source>: the <what> is not valid:`."""
    lines = [f"{source}: the {what} is not valid:"]
    for err in e.errors():
        key = ".".join(str(p) for p in err["loc"]) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling)"
        elif err["type"] == "missing":
            msg = "required key is missing"
        lines.append(f"  {key}: {msg}")
    return "\n".join(lines)
