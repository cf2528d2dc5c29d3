"""Fixtures for backend tests: a per-session artifact cache, device descriptions, models cut
into partitions with the eager values each partition must reproduce."""

from __future__ import annotations

import os

import pytest
import torch

from hetero.backends.base import CompileUnit
from hetero.backends.cache import ArtifactCache
from hetero.cluster.spec import DeviceSpec


@pytest.fixture(scope="session")
def artifact_cache(tmp_path_factory) -> ArtifactCache:
    """One cache for the session, so a TVM build made by one test is a hit for the next."""
    return ArtifactCache(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="session")
def cpu_device() -> DeviceSpec:
    return DeviceSpec(
        name="local/cpu",
        kind="cpu",
        host="local",
        cores=max(1, min(2, os.cpu_count() or 1)),
        dtypes=("float32", "float16", "bfloat16"),
    )


@pytest.fixture(scope="session")
def npu_device() -> DeviceSpec:
    return DeviceSpec(
        name="local/npu",
        kind="npu",
        host="local",
        dtypes=("float16", "int8"),
        emulated=True,
    )


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    if not want.is_floating_point():
        return 0.0 if torch.equal(got, want) else float("inf")
    g, w = got.double(), want.double()
    return float((g - w).norm() / w.norm().clamp_min(1e-12))


def check_outputs(unit: CompileUnit, outs, env, tol: float) -> None:
    """Every output of `unit` (pytree leaves) within `tol` relative error of the eager env."""
    from torch.utils._pytree import tree_leaves

    want = tree_leaves([env[o] for o in unit.outputs])
    got = tree_leaves(list(outs))
    assert len(got) == len(want), f"{unit.name}: {len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert g.shape == w.shape and g.dtype == w.dtype, (unit.name, i, g.shape, w.shape)
        err = rel_err(g, w)
        assert err < tol, f"{unit.name} output {i}: relative error {err:.2e} >= {tol:.0e}"


@pytest.fixture(scope="session")
def outputs_match():
    """check_outputs, as a fixture (test modules here are not a package)."""
    return check_outputs
