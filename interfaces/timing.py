"""Timed runs and their spread, as `hetero bench` and `hetero run` report them, and the
thread settings the numbers were taken with."""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from hetero.cluster.spec import ClusterSpec
from hetero.environment import THREAD_VARIABLES


def timed_ms(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    """Milliseconds of each of `runs` calls, after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def spread(times: list[float]) -> dict[str, float]:
    """p10, p50 (the median) and p90 of `times`: a shared machine's noise shows as the gap."""
    if len(times) == 1:
        return {"p10": times[0], "p50": times[0], "p90": times[0]}
    deciles = statistics.quantiles(times, n=10, method="inclusive")
    return {"p10": deciles[0], "p50": statistics.median(times), "p90": deciles[8]}


def thread_settings(cluster: ClusterSpec | None = None) -> dict[str, Any]:
    """The threads this process computes with now (torch's intra- and inter-op pools), the
    variables that shape them, and the threads each CPU/NPU device's partitions run with
    (its cores: TVM's pool and torch's are sized to them when a partition loads)."""
    out: dict[str, Any] = {
        "torch": torch.get_num_threads(),
        "torch_interop": torch.get_num_interop_threads(),
        "cpu_count": os.cpu_count(),
        "env": {k: os.environ.get(k) for k in THREAD_VARIABLES},
    }
    if cluster is not None:
        out["devices"] = {
            d.name: d.cores or os.cpu_count() for d in cluster.devices if d.kind in ("cpu", "npu")
        }
    return out
