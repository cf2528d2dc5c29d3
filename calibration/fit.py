"""Fitting a profile entry to measurements: per op class, a grid search for (e_compute,
e_memory, overhead) minimising the mean relative error of

    max(F / (peak e_c), B / (bw e_m)) + overhead

against the samples (the cost model's roofline, `partitioner/cost.py`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from hetero.cluster.profile import CalibrationProfile, DeviceProfile, Efficiency

# The op class of the units that check the fitted classes on a whole partition: pre-LN
# transformer blocks (two widths) compiled as one unit each, priced as the sum of their
# coarse groups. The geometric mean of measured / predicted becomes the entry's
# `sequence_factor`: what running kernels back to back costs beyond each alone (thread
# pools handing the cores to each other, e.g. TVM's to the BLAS library's, caches), which
# no microbenchmark of one kernel sees.
BLOCK = "block"
CALL = "call"  # the op class of the unit that measures calling a compiled partition

_GRID = np.geomspace(0.002, 1.5, 64)


@dataclass(frozen=True)
class Sample:
    op_class: str
    label: str
    flops: float
    nbytes: float
    seconds: float
    dtype: str = ""  # what it ran in ("": the profile's first dtype)
    peak: float = 0.0  # the FLOP/s peak of that dtype its factors are relative to (0: entry's)


_OVERHEAD_GRID = np.array([0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


# Compiled kernels span a wider range than eager ops: a scalar transcendental loop reaches
# a ten-thousandth of a datasheet peak (an emulated NPU's peak is a TFLOPS), and a small
# tensor that stays in cache moves faster than the DRAM bandwidth the factors are relative to.
_WIDE_GRID = np.geomspace(1e-5, 8.0, 112)
# A compiled kernel's overhead ranges from a TIR loop's entry (~0.1 us) to a call back into
# a library through the FFI (tens of us): searched over this whole range.
_KERNEL_OVERHEAD_GRID = np.concatenate([[0.0], np.geomspace(1e-7, 2e-3, 56)])


def fit(
    samples: list[Sample],
    peak: float,
    bandwidth: float,
    overhead: float,
    overheads: np.ndarray | None = None,
    grid: np.ndarray | None = None,
) -> tuple[float, float, float, float]:
    """(e_compute, e_memory, per-op overhead, mean |relative error|) for one op class.

    The overhead is searched around the measured one-element op (a class's own dispatch,
    argument parsing, output allocation, differs from an add's), or over `overheads`; the
    efficiencies over `grid` (default: 0.002 to 1.5)."""
    grid = _GRID if grid is None else grid
    f = np.array([s.flops for s in samples])
    b = np.array([s.nbytes for s in samples])
    t = np.array([s.seconds for s in samples])
    tc = f[None, :] / (peak * grid[:, None])  # [G, S]
    tm = b[None, :] / (bandwidth * grid[:, None])
    roof = np.maximum(tc[:, None, :], tm[None, :, :])  # [Gc, Gm, S]
    best = (np.inf, 0, 0, overhead)
    for ov in overhead * _OVERHEAD_GRID if overheads is None else overheads:
        err = (np.abs(roof + ov - t) / t).mean(axis=2)
        i, j = np.unravel_index(int(np.argmin(err)), err.shape)
        if err[i, j] < best[0]:
            best = (float(err[i, j]), i, j, float(ov))
    err, i, j, ov = best
    return float(grid[i]), float(grid[j]), ov, err


def fit_classes(
    samples: list[Sample],
    peak: float,
    bw: float,
    overhead: float,
    dtype: str,
    overheads: np.ndarray | None = None,
    grid: np.ndarray | None = None,
) -> tuple[Efficiency, ...]:
    effs = []
    for cls in dict.fromkeys(s.op_class for s in samples):
        mine = [s for s in samples if s.op_class == cls]
        ec, em, ov, err = fit(mine, peak, bw, overhead, overheads, grid)
        effs.append(Efficiency(f"{cls}/{dtype}", ec, em, err, len(mine), ov))
        effs.append(Efficiency(cls, ec, em, err, len(mine), ov))
    return tuple(effs)


def sample_prediction(entry: DeviceProfile, sample: Sample) -> float:
    """Seconds the fitted factors of `entry` predict for one of its samples."""
    if sample.op_class == BLOCK:
        return sample.seconds  # checked as a whole: see `sequence_factor`
    by_key = {e.key: e for e in entry.efficiency}
    e = by_key.get(f"{sample.op_class}/{sample.dtype}") or by_key[sample.op_class]
    peak = sample.peak or entry.peak_flops
    t_c = sample.flops / (peak * e.compute) if sample.flops else 0.0
    t_m = sample.nbytes / (entry.mem_bandwidth * e.memory) if sample.nbytes else 0.0
    return max(t_c, t_m) + (e.overhead or 0.0)


def fit_errors(
    profile: CalibrationProfile,
) -> list[tuple[str, str, str, float, float, float, float, int]]:
    """(device, backend, "op class/dtype", e_compute, e_memory, overhead s, error, samples)
    per class and dtype measured."""
    rows = []
    for dp in profile.devices:
        for e in dp.efficiency:
            if "/" in e.key:
                rows.append(
                    (
                        dp.device,
                        dp.backend,
                        e.key,
                        e.compute,
                        e.memory,
                        e.overhead or 0.0,
                        e.error,
                        e.samples,
                    )
                )
    return rows
