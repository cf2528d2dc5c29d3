"""Load an exported model file without running code from it.

`torch.export.load` reads a .pt2 archive; parts of it may be pickles, and torch falls
back to `weights_only=False` (and plain `pickle.loads` for opaque objects) when the
safe loader refuses one. A pickle can name any Python callable, so before torch sees
the file every pickle inside it (nested torch.save archives included) is scanned,
without executing it, for the globals it would import. Anything outside torch's own
weights-only allowlist is refused, as are embedded Python objects.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import _weights_only_unpickler

from hetero.errors import ConfigError

_MAX_DEPTH = 4  # archives inside archives (torch.save blobs inside the .pt2)
_OBJECT_MEMBERS = ("custom_obj_", "opaque_obj_")  # pickled Python objects, never tensors


def _allowed_globals() -> set[str]:
    allowed: set[str] = set()
    try:
        allowed |= set(_weights_only_unpickler._get_allowed_globals())
    except AttributeError:  # a torch without it: allow tensor rebuilding only
        allowed |= {
            "collections.OrderedDict",
            "torch._utils._rebuild_tensor_v2",
            "torch._utils._rebuild_parameter",
            "torch.FloatStorage",
        }
    for g in torch.serialization.get_safe_globals():
        obj = g[0] if isinstance(g, tuple) else g
        allowed.add(f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', obj)}")
    return allowed


def _pickle_globals(data: bytes) -> list[str]:
    """Globals a pickle would import, read opcode by opcode without executing anything."""
    found: list[str] = []
    strings: list[str] = []  # recent string pushes, for STACK_GLOBAL's two operands
    memo: dict[int, Any] = {}
    try:
        for op, arg, _pos in pickletools.genops(io.BytesIO(data)):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif name == "STACK_GLOBAL":
                found.append(".".join(strings[-2:]) if len(strings) >= 2 else "<unknown>")
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE"):
                strings.append(str(arg))
            elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                memo[int(arg)] = strings[-1] if strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = strings[-1] if strings else None
            elif name in ("BINGET", "LONG_BINGET", "GET"):
                v = memo.get(int(arg))
                if isinstance(v, str):
                    strings.append(v)
    except Exception:  # a truncated or corrupt pickle: what was read so far is what counts
        pass
    return found


def _looks_like_pickle(data: bytes) -> bool:
    return data[:1] == b"\x80"  # protocol 2+ (what torch.save and pickle.dumps write)


def scan_archive(data: bytes, where: str, depth: int = 0) -> None:
    """Raise ConfigError if any pickle inside the (zip) archive would import a non-tensor global."""
    allowed = _allowed_globals()
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            if base.startswith(_OBJECT_MEMBERS):
                raise ConfigError(
                    f"{where}: the archive embeds a pickled Python object ({info.filename}); "
                    "hetero loads tensors and graphs only. Re-export without custom objects."
                )
            member = zf.read(info)
            if zipfile.is_zipfile(io.BytesIO(member)) and depth < _MAX_DEPTH:
                scan_archive(member, f"{where} ({info.filename})", depth + 1)
                continue
            if not (info.filename.endswith(".pkl") or _looks_like_pickle(member)):
                continue
            bad = sorted({g for g in _pickle_globals(member) if g not in allowed})
            if bad:
                raise ConfigError(
                    f"{where}: refusing to load: {info.filename} is a pickle that would import "
                    f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''} and could run code. "
                    "hetero loads only programs written by torch.export.save from a trusted "
                    "source; re-export the model with torch.export.export + torch.export.save."
                )


def load_exported(path: str | Path, where: str = "") -> tuple[Any, tuple[Any, ...]]:
    """A .pt2 file's program as a module and its saved example inputs, after the safety scan."""

    p = Path(path)
    where = where or str(p)
    data = p.read_bytes()
    if not zipfile.is_zipfile(io.BytesIO(data)):
        raise ConfigError(
            f"{where}: {p.name} is not a .pt2 archive (torch.export.save writes a zip); "
            "a bare pickle can run code when loaded, so hetero refuses it"
        )
    scan_archive(data, where)
    try:
        ep = torch.export.load(io.BytesIO(data))
    except Exception as e:  # torch raises many types for a malformed archive
        raise ConfigError(f"{where}: torch.export.load could not read {p.name}: {e}") from None
    example = ep.example_inputs
    if not example or not example[0]:
        raise ConfigError(
            f"{where}: {p.name} has no example inputs; export it from real inputs "
            "(torch.export.export(model, example_inputs)) so hetero can plan with their shapes"
        )
    return ep.module(), tuple(example[0])
