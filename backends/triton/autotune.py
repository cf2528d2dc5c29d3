"""Tile sizes chosen by measurement, per GPU model and kernel shape, cached on disk.

The cache is one JSON file per GPU model (kernel key -> config); a kernel key hashes the
kernel's source and its shapes, so the same layer in another model reuses the choice.
Tuning runs each candidate launcher on the partition's real intermediate tensors (caught
while `forward` runs once on the example inputs) and keeps the fastest.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hetero.backends.triton.kernels import attention, decode, matmul_epilogue

_MATMUL = tuple(matmul_epilogue.as_cfg(c) for c in matmul_epilogue.CANDIDATES)
CANDIDATES: dict[str, tuple[dict, ...]] = {
    "matmul": _MATMUL,
    # two fp32 accumulators: tiles up to 128 x 128 keep them in registers
    "gated": tuple(c for c in _MATMUL if c["BLOCK_M"] * c["BLOCK_N"] <= 128 * 128),
    "attention": tuple(attention.as_cfg(c) for c in attention.CANDIDATES),
    "decode": tuple(decode.as_cfg(c) for c in decode.CANDIDATES),
}


def candidates(kernel: Any) -> tuple[dict, ...]:
    """Configs worth trying for a kernel: tiles no larger than its (padded) output."""
    cands = CANDIDATES[kernel.kind]
    if kernel.kind not in ("matmul", "gated") or len(kernel.space) != 3:
        return cands
    _, m, n = kernel.space
    fit = tuple(
        c for c in cands
        if c["BLOCK_M"] <= max(16, 1 << (m - 1).bit_length())
        and c["BLOCK_N"] <= max(16, 1 << (n - 1).bit_length())
    )  # fmt: skip
    return fit or cands


def cache_file(root: Path, gpu_name: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu_name).strip("-").lower() or "gpu"
    return root / f"{slug}.json"


@dataclass(frozen=True)
class TuneCache:
    """Configs by kernel key for one GPU model, read from and written to `path`."""

    path: Path

    def read(self) -> dict[str, dict]:
        try:
            return dict(json.loads(self.path.read_text()))
        except (OSError, ValueError):
            return {}

    def write(self, found: Mapping[str, dict]) -> None:
        table = self.read()
        table.update(found)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
        tmp.replace(self.path)  # atomic: parallel compiles never see half a file


def tune(
    module: Any,
    kernels: Sequence[Any],
    run: Callable[[], object],
    known: Mapping[str, dict],
    trials: int = 0,
) -> dict[str, dict]:
    """Measure candidate configs of `kernels` (codegen.Kernel) not in `known`.

    Wraps each such launcher of the loaded program `module`, calls `run()` once (which runs
    `forward` on example inputs), and returns key -> fastest config.
    """
    from triton.testing import do_bench  # optional (hetero[triton]): loaded on first use

    found: dict[str, dict] = {}
    originals: dict[str, Callable] = {}
    for k in kernels:
        if k.kind not in CANDIDATES or k.key in known:
            continue
        launcher = getattr(module, f"launch_{k.name}")
        originals[k.name] = launcher
        cands = candidates(k)[: trials or None]

        def wrapped(*args, _k=k, _launch=launcher, _cands=cands, cfg=None):
            if _k.key not in found:
                best, best_ms = None, float("inf")
                for c in _cands:
                    try:
                        ms = do_bench(lambda c=c: _launch(*args, cfg=c), warmup=5, rep=25)
                    except Exception:  # a tile that does not fit this GPU (shared memory)
                        continue
                    if ms < best_ms:
                        best, best_ms = c, ms
                if best is not None:
                    found[_k.key] = dict(best, ms=round(best_ms, 5))
            cfg = found.get(_k.key)
            return _launch(*args, cfg={x: v for x, v in cfg.items() if x != "ms"} if cfg else None)

        setattr(module, f"launch_{k.name}", wrapped)
    try:
        if originals:
            run()
    finally:
        for name, fn in originals.items():
            setattr(module, f"launch_{name}", fn)
    return found
