"""Parse quantities written the way datasheets write them: "3.35 TB/s", "80 GB", "989 TFLOPS", "5 us"."""

from __future__ import annotations

import re

_PREFIX = {
    "": 1.0,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}
_TIME = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_NUM = r"([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"
_QTY = re.compile(rf"^\s*{_NUM}\s*([A-Za-zµ/]*)\s*$")


class UnitError(ValueError):
    pass


def _split(text: str | float | int) -> tuple[float, str]:
    if isinstance(text, bool):
        raise UnitError(f"expected a quantity, got {text!r}")
    if isinstance(text, int | float):
        return float(text), ""
    m = _QTY.match(str(text))
    if not m:
        raise UnitError(f"cannot read {text!r} as a number with a unit")
    return float(m.group(1)), m.group(2)


def _scaled(text: str | float | int, suffixes: tuple[str, ...], what: str) -> float:
    value, unit = _split(text)
    if unit == "":
        return value
    for suffix in suffixes:
        if unit.endswith(suffix):
            prefix = unit[: -len(suffix)]
            if prefix in _PREFIX:
                return value * _PREFIX[prefix]
    raise UnitError(
        f"cannot read {text!r} as {what} (units like {', '.join(suffixes)} with k/M/G/T/Gi)"
    )


def parse_bytes(text: str | float | int) -> float:
    """Bytes: "80 GB" (decimal), "80 GiB" (binary), or a plain number of bytes."""
    return _scaled(text, ("B",), "a size")


def parse_bandwidth(text: str | float | int) -> float:
    """Bytes per second: "3.35 TB/s", "64 GB/s", or a plain number."""
    return _scaled(text, ("B/s", "Bps"), "a bandwidth")


def parse_flops(text: str | float | int) -> float:
    """FLOP/s: "989 TFLOPS", "1.2 TFLOP/s", or a plain number."""
    return _scaled(text, ("FLOPS", "FLOP/s", "flops", "OPS", "OP/s"), "a compute rate")


def parse_seconds(text: str | float | int) -> float:
    """Seconds: "5 us", "1.5 ms", or a plain number of seconds."""
    value, unit = _split(text)
    if unit == "":
        return value
    if unit in _TIME:
        return value * _TIME[unit]
    raise UnitError(f"cannot read {text!r} as a time (units: s, ms, us, ns)")
