"""Quantities written the way datasheets write them: "3.35 TB/s", "80 GB", "989 TFLOPS", "5 us".

Read with pint, so every SI and IEC prefix, "µs" and "us", bits ("100 Gb/s") and bytes
work, and a quantity of the wrong kind ("20 GB" for a bandwidth) is caught by its
dimension. A number without a unit is refused (except 0): `memory: 24` could mean bytes or
GiB, and reading it as bytes gave plans that were wrong by a factor of a billion. Every
refusal suggests a value that would be read (the number with a plausible unit, or the
closest unit spelling, by difflib).
"""

from __future__ import annotations

import difflib
import functools
import math
from dataclasses import dataclass

import pint


class UnitError(ValueError):
    pass


@dataclass(frozen=True)
class Kind:
    """What a field holds: its pint dimension, the unit its value is stored in, the units a
    suggestion picks from and a typical value (bare numbers get the unit that puts them
    nearest to it)."""

    name: str  # "a size", for messages
    base: str  # the stored unit, e.g. "B"
    units: tuple[str, ...]  # the spellings a suggestion uses, preferred first
    typical: float  # in `base`

    @functools.cached_property
    def dimensionality(self) -> object:
        return registry().Unit(self.base).dimensionality


SIZE = Kind("a size", "B", ("GB", "GiB", "MB", "MiB", "TB", "TiB", "kB", "KiB", "B"), 16e9)
BANDWIDTH = Kind(
    "a bandwidth",
    "B/s",
    ("GB/s", "MB/s", "TB/s", "kB/s", "GiB/s", "MiB/s", "Gb/s", "B/s"),
    50e9,
)
RATE = Kind("a compute rate", "FLOPS", ("TFLOPS", "GFLOPS", "PFLOPS", "MFLOPS", "TOPS"), 50e12)
LATENCY = Kind("a time", "s", ("us", "ms", "ns", "s"), 10e-6)  # per launch, per hop
DURATION = Kind("a time", "s", ("s", "ms", "min"), 10.0)  # deadlines, grace periods
KINDS = (SIZE, BANDWIDTH, RATE, LATENCY)


# pint's own registry reads a bit as dimensionless and "Gb" as a gilbert: hetero's quantities
# get a registry of their own, with data, time and compute as dimensions.
_DEFINITIONS = """
nano- = 1e-9 = n-
micro- = 1e-6 = u- = µ- = μ-
milli- = 1e-3 = m-
kilo- = 1e3 = k- = K-
mega- = 1e6 = M-
giga- = 1e9 = G-
tera- = 1e12 = T-
peta- = 1e15 = P-
exa- = 1e18 = E-
kibi- = 2**10 = Ki-
mebi- = 2**20 = Mi-
gibi- = 2**30 = Gi-
tebi- = 2**40 = Ti-
pebi- = 2**50 = Pi-
second = [time] = s = sec
minute = 60 * second = min
hour = 3600 * second = h
byte = [data] = B
bit = byte / 8 = b
FLOP = [compute] = flop
OP = FLOP = op
FLOPS = FLOP / second = flops
OPS = OP / second = ops
Bps = byte / second
"""


@functools.cache
def registry() -> pint.UnitRegistry:
    """Data (B, b with SI and IEC prefixes), time (s, ms, us/µs, ns, min) and compute
    (FLOPS; OPS for integer operations, "6 TOPS"). Made on first use, once per process."""
    ureg = pint.UnitRegistry(None)
    for line in _DEFINITIONS.strip().splitlines():
        ureg.define(line)
    return ureg


def parse(text: str | float | int, kind: Kind) -> float:
    """`text` as a number of `kind.base` units; a UnitError that suggests a value otherwise."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise UnitError(f"expected {kind.name} such as {_example(kind)}, got {text!r}")
    if isinstance(text, int | float):
        if text == 0:
            return 0.0
        raise UnitError(
            f"{text!r} has no unit; {kind.name} needs one ({', '.join(kind.units[:4])}, ...): "
            f"did you mean {_guess(float(text), kind)}?"
        )
    if "," in text:
        raise UnitError(f"{text!r}: write a decimal point, not a comma (e.g. {_example(kind)})")
    if not any(c.isdigit() for c in text):
        raise UnitError(f"{text!r} has no number; write one with its unit, e.g. {_example(kind)}")
    ureg = registry()
    try:
        q = ureg.Quantity(text.strip())
    except (pint.UndefinedUnitError, pint.DefinitionSyntaxError) as e:
        raise UnitError(_unknown_unit(text, kind, e)) from None
    except Exception:  # pint's tokenizer raises several kinds on text that is no quantity
        raise UnitError(
            f"cannot read {text!r} as {kind.name}; write a number and a unit, e.g. {_example(kind)}"
        ) from None
    if not isinstance(q, pint.Quantity):  # "5" alone parses to a plain number
        return parse(float(q), kind)
    if q.dimensionless:
        return parse(float(q.magnitude), kind)
    if q.dimensionality != kind.dimensionality:
        raise UnitError(_wrong_kind(text, q, kind))
    value = float(q.to(kind.base).magnitude)
    if math.isnan(value) or value < 0:
        raise UnitError(f"{text!r}: {kind.name} cannot be negative")
    return value


def format_quantity(value: float, kind: Kind) -> str:
    """`value` (in `kind.base`) with the preferred unit that gives it 1 to 3 integer digits."""
    ureg = registry()
    for unit in kind.units:
        m = float(ureg.Quantity(value, kind.base).to(unit).magnitude)
        if 1 <= m < 1000:
            return f"{m:g} {unit}"
    return f"{value:g} {kind.base}"


def _example(kind: Kind) -> str:
    return repr(format_quantity(kind.typical, kind))


def _guess(number: float, kind: Kind) -> str:
    """`number` with the unit that puts it nearest the kind's typical value (within a factor
    of ten the unit listed first wins: "20000" as a bandwidth is MB/s, not MiB/s); a number
    already plausible in the stored unit ("2e10" bytes per second) is shown as it reads."""
    ureg = registry()
    units = (*kind.units, kind.base)

    def distance(unit: str) -> tuple[float, int]:
        value = float(ureg.Quantity(abs(number), unit).to(kind.base).magnitude)
        off = abs(math.log10(value / kind.typical)) if value > 0 else math.inf
        return math.floor(off), units.index(unit)

    best = min(units, key=distance)
    if best == kind.base:
        return repr(format_quantity(number, kind))
    return repr(f"{number:g} {best}")


def _unknown_unit(text: str, kind: Kind, e: Exception) -> str:
    number, _, unit = text.strip().partition(" ")
    if not unit:  # "20GBs": split the number off where the letters start
        i = next((i for i, c in enumerate(text) if c.isalpha() or c in "µ/"), len(text))
        number, unit = text[:i].strip(), text[i:].strip()
    spellings = [u for k in (kind, *KINDS) for u in k.units]
    close = difflib.get_close_matches(unit, list(dict.fromkeys(spellings)), n=1, cutoff=0.5)
    hint = f": did you mean {f'{number} {close[0]}'!r}?" if close and number else ""
    return f"cannot read {text!r} as {kind.name} ({e}){hint or f'; e.g. {_example(kind)}'}"


def _wrong_kind(text: str, q: pint.Quantity, kind: Kind) -> str:
    have = next((k.name for k in KINDS if q.dimensionality == k.dimensionality), "")
    what = f"{have}, not {kind.name}" if have else f"not {kind.name}"
    unit = f"{q.units:~}".replace(" ", "")
    close = difflib.get_close_matches(unit, list(kind.units), n=1, cutoff=0.4)
    hint = f"did you mean {f'{q.magnitude:g} {close[0]}'!r}?" if close else f"e.g. {_example(kind)}"
    return f"{text!r} is {what}: {hint}"


def parse_bytes(text: str | float | int) -> float:
    """Bytes: "80 GB" (decimal), "80 GiB" (binary)."""
    return parse(text, SIZE)


def parse_bandwidth(text: str | float | int) -> float:
    """Bytes per second: "3.35 TB/s", "64 GB/s", "100 Gb/s" (bits)."""
    return parse(text, BANDWIDTH)


def parse_flops(text: str | float | int) -> float:
    """FLOP/s: "989 TFLOPS", "1.2 TFLOP/s", "6 TOPS"."""
    return parse(text, RATE)


def parse_seconds(text: str | float | int) -> float:
    """Seconds: "5 us", "1.5 ms", "30 s"."""
    return parse(text, LATENCY)
