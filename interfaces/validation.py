"""What a request may hold, checked before anything runs: one layer for every way in.

`Contract.from_graph(graph)` reads a model's inputs (name, dtype, shape, dynamic dims and
their ranges) and the index bounds the partitioner derives from the graph
(partitioner/bounds.py). `contract.check(tensors)` raises InvalidInput naming the input,
the element and the bound. It knows nothing of protobuf: hetero.v1 (serving/), the Open
Inference Protocol, the Ray actor and the Python API all call the same check. The Python
API's local calls use `contract.admit(tensors)`, the same check that reads a GPU input's
values only once the request is queued (on values that cannot fault until then), so that no
call waits for the GPU to go idle before it can launch.

What is invalid, per dtype:
  bool      a byte other than 0 or 1 (torch and the compiled kernels assume one of the two;
            anything else is a different answer on each backend)
  floats    NaN or ±Inf when the contract is `finite` (the servers' default, since no
            served model means anything by them; the Python API keeps eager's behaviour
            and passes them through, and `serving.allow_nonfinite` turns it off for models
            that take, say, additive -inf masks)
  integers  any value, except where the input indexes a table
  an input that indexes a table (through views and casts): every element in [low, high),
            floats truncated as the cast would (NaN and ±Inf never pass)
Shapes: rank, static sizes, one size per dim symbol across inputs, and each symbol's range
(torch.export's range constraints, tightened to the size of any table that an `arange` of
the dim indexes: a position embedding of 128 rows takes prompts of at most 128).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from hetero.errors import InvalidInput
from hetero.partitioner.bounds import IndexBound, index_bounds
from hetero.partitioner.graph import OpGraph, TensorMeta


@dataclass(frozen=True)
class InputRule:
    name: str
    meta: TensorMeta
    bound: IndexBound | None = None  # set when the input indexes a table


@dataclass(frozen=True)
class DimRange:
    """A dynamic dim's allowed sizes, low..high inclusive (high None: no upper limit)."""

    symbol: str
    low: int = 0
    high: int | None = None
    why: str = ""  # where an upper limit below torch.export's comes from

    def describe(self) -> str:
        top = "" if self.high is None else str(self.high)
        return f"{self.low}..{top}" + (f" (an arange of it indexes {self.why})" if self.why else "")


@dataclass(frozen=True)
class Contract:
    """A model's inputs as a caller must give them; `check` them before running anything."""

    inputs: tuple[InputRule, ...]
    dims: Mapping[str, DimRange] = field(default_factory=dict)
    finite: bool = False  # reject NaN/±Inf in floating inputs

    @classmethod
    def from_graph(cls, graph: OpGraph, *, finite: bool = False) -> Contract:
        bounds = index_bounds(graph)
        dims: dict[str, DimRange] = {}
        for sym, vr in graph.program.range_constraints.items():
            low = _finite_int(vr.lower)
            dims[str(sym)] = DimRange(str(sym), max(0, low or 0), _finite_int(vr.upper))
        for sym, limit in bounds.dims.items():
            have = dims.get(sym, DimRange(sym))
            if have.high is None or limit.most < have.high:
                why = "; ".join(u.describe() for u in limit.uses)
                dims[sym] = replace(have, high=limit.most, why=why)
        rules = tuple(
            InputRule(name, meta, bounds.inputs.get(name)) for name, meta in graph.inputs.items()
        )
        return cls(rules, dims, finite)

    @classmethod
    def from_metas(cls, metas: Mapping[str, TensorMeta], *, finite: bool = False) -> Contract:
        """Names, dtypes and shapes only (a servable that knows no more)."""
        return cls(tuple(InputRule(n, m) for n, m in metas.items()), {}, finite)

    def with_finite(self, finite: bool = True) -> Contract:
        return replace(self, finite=finite)

    @property
    def metas(self) -> dict[str, TensorMeta]:
        return {r.name: r.meta for r in self.inputs}

    def summary(self) -> str:
        return ", ".join(f"{r.name} ({_expected(r.meta)})" for r in self.inputs)

    # ---- checking ------------------------------------------------------------------------------
    def check_names(self, names: Iterable[str]) -> None:
        """Raise InvalidInput naming the missing or unknown inputs, if any."""
        names = list(names)
        missing = [r.name for r in self.inputs if r.name not in names]
        if missing:
            raise InvalidInput(
                f"missing input {', '.join(map(repr, missing))}; expected: {self.summary()}"
            )
        known = {r.name for r in self.inputs}
        extra = [n for n in names if n not in known]
        if extra:
            raise InvalidInput(
                f"unknown input {', '.join(map(repr, extra))}; expected: {self.summary()}"
            )

    def check(self, tensors: Mapping[str, Any]) -> None:
        """Raise InvalidInput unless `tensors` (name -> tensor) is a valid request."""
        self._check_shapes(tensors)
        for rule in self.inputs:
            self._check_values(rule, tensors[rule.name])

    def admit(self, tensors: Mapping[str, Any]) -> Admission:
        """`check`, without waiting on a GPU: names, dtypes and shapes are checked now (the
        host knows them), and so are values on the host; a GPU tensor's values are checked
        by kernels queued ahead of the request, whose verdict `Admission.verdict()` reads
        once the request's own work is queued. Until then the request runs on values that
        cannot fault: an index input clamped into its bound (an index out of a table's
        range is a device-side assert, which kills the process's CUDA context). Reading a
        GPU check at once stalled the host until the GPU was idle on every call: a program
        the GPU runs faster than the host launches it then costs both times, one after the
        other (Mixtral, launched op by op: 8.5 ms a call against the 5.0 its measured choice
        timed, backend_suite.md run 48)."""
        self._check_shapes(tensors)
        inputs = dict(tensors)
        pending: list[_Pending] = []
        for rule in self.inputs:
            t = tensors[rule.name]
            deferred = _on_device_check(rule, t) if t.device.type == "cuda" else None
            if deferred is None:
                self._check_values(rule, t)
                continue
            ok, safe = deferred
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(ok, non_blocking=True)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(t.device))
            inputs[rule.name] = safe
            pending.append(_Pending(rule, t, flag, done))
        return Admission(inputs, tuple(pending), self)

    def _check_shapes(self, tensors: Mapping[str, Any]) -> None:
        self.check_names(tensors)
        # dim symbol -> (size, the input and axis that set it)
        sizes: dict[str, tuple[int, str, int]] = {}
        for rule in self.inputs:
            self._check_structure(rule, tensors[rule.name], sizes)
        for sym, (size, name, axis) in sizes.items():
            dim = self.dims.get(sym)
            if dim is None:
                continue
            if size < dim.low or (dim.high is not None and size > dim.high):
                raise InvalidInput(
                    f"input {name!r}: dim {axis} ({sym}) is {size}; the model takes "
                    f"{dim.describe()}"
                )

    def _check_structure(
        self, rule: InputRule, t: Any, sizes: dict[str, tuple[int, str, int]]
    ) -> None:
        name, meta = rule.name, rule.meta
        if not isinstance(t, torch.Tensor):
            raise InvalidInput(
                f"input {name!r} is a {type(t).__name__}; expected a tensor {_expected(meta)}"
            )
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype != meta.dtype:
            raise InvalidInput(
                f"input {name!r}: dtype {dtype} but the model expects {meta.dtype} "
                f"({_expected(meta)})"
            )
        shape = tuple(t.shape)
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
            elif want in sizes and sizes[want][0] != got:
                size, other, _ = sizes[want]
                raise InvalidInput(
                    f"input {name!r}: dim {axis} ({want}) is {got} but {other!r} set {want}={size}"
                )
            else:
                sizes.setdefault(want, (got, name, axis))

    def _check_values(self, rule: InputRule, t: torch.Tensor) -> None:
        if t.numel() == 0:
            return
        name = rule.name
        if t.dtype == torch.bool:
            raw = t.detach().reshape(-1).view(torch.uint8)
            if int(raw.max()) > 1:
                bad = raw > 1
                at = _first(bad, t.shape)
                raise InvalidInput(
                    f"input {name!r}: element {at} of a bool tensor holds byte "
                    f"{int(raw[bad].reshape(-1)[0])}; a bool is 0 or 1 "
                    f"({int(bad.sum())} bad element(s))"
                )
            return
        floating = t.is_floating_point()
        if floating and (self.finite or rule.bound is not None):
            finite = torch.isfinite(t)
            if not bool(finite.all()):
                at = _first(~finite, t.shape)
                value = float(t.detach()[tuple(at)])
                why = "it indexes a table" if rule.bound is not None else "NaN and ±Inf are refused"
                raise InvalidInput(
                    f"input {name!r}: element {at} is {value}; {why} "
                    f"({int((~finite).sum())} non-finite element(s))"
                )
        bound = rule.bound
        if bound is None:
            return
        values = torch.trunc(t.detach()) if floating else t.detach()
        lo, hi = torch.aminmax(values)
        if int(lo) >= bound.low and int(hi) < bound.high:
            return
        bad = (values < bound.low) | (values >= bound.high)
        at = _first(bad, t.shape)
        value = t.detach()[tuple(at)].item()
        raise InvalidInput(
            f"input {name!r}: element {at} is {value}, outside {bound.describe()}; "
            f"{int(bad.sum())} element(s) out of range"
        )


@dataclass(frozen=True)
class _Pending:
    """A GPU input's value check, queued: `flag` (pinned host memory) holds whether it
    passed once `done` has happened."""

    rule: InputRule
    value: torch.Tensor
    flag: torch.Tensor
    done: torch.cuda.Event


@dataclass(frozen=True)
class Admission:
    """A request let in (`Contract.admit`): `inputs` to run it on, and `verdict()` to call
    once its work is queued and before its outputs are handed to anyone."""

    inputs: dict[str, Any]
    pending: tuple[_Pending, ...]
    contract: Contract

    def verdict(self) -> None:
        """Raise InvalidInput, as `Contract.check` would have, where a GPU input's values
        fail their check; what ran on its stand-in values is then never handed out."""
        for p in self.pending:
            p.done.synchronize()  # the check's kernels only, queued before the request's
            if not bool(p.flag):
                self.contract._check_values(p.rule, p.value)  # says which element, and why
                raise InvalidInput(f"input {p.rule.name!r}: its values failed their check")


def _on_device_check(rule: InputRule, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(a 0-dim bool on `t`'s device: whether its values pass, the tensor to run on until
    that is known) for the checks that need no host value: a bool's bytes, an integer index
    input's range; None for the rest (checked at once, as `_check_values` does)."""
    if t.numel() == 0:
        return None
    if t.dtype == torch.bool:
        return (t.detach().reshape(-1).view(torch.uint8) <= 1).all(), t
    bound = rule.bound
    if bound is None or t.is_floating_point() or t.is_complex():
        return None
    values = t.detach()
    ok = ((values >= bound.low) & (values < bound.high)).all()
    return ok, values.clamp(bound.low, bound.high - 1)


def _first(mask: torch.Tensor, shape: torch.Size) -> list[int]:
    """The index (one int per dim) of the first True element of `mask`."""
    flat = int(torch.nonzero(mask.reshape(-1))[0])
    out = []
    for size in reversed(tuple(shape)):
        out.append(flat % size)
        flat //= size
    return out[::-1]


def _finite_int(x: Any) -> int | None:
    """An int from a sympy bound; None for an infinite one (oo, int_oo)."""
    if not getattr(x, "is_integer", False) or not getattr(x, "is_finite", True):
        return None
    try:
        v = int(x)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None
    return v if abs(v) < 2**62 else None


def _expected(meta: TensorMeta) -> str:
    return f"{meta.dtype}[{', '.join(str(s) for s in meta.shape)}]"
