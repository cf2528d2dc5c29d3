"""Measuring the links a calibration can reach from here: host<->GPU copies."""

from __future__ import annotations

import torch

from hetero.calibration.timing import time_call
from hetero.cluster.profile import LinkProfile
from hetero.cluster.spec import DeviceSpec


def calibrate_link(gpu: DeviceSpec, host: DeviceSpec) -> LinkProfile:
    """Pinned host->device copies of two sizes give latency and bandwidth."""
    dev = torch.device("cuda", gpu.index)
    sizes = [1 << 16, 1 << 26]
    times = []
    for n in sizes:
        src = torch.empty(n, dtype=torch.uint8).pin_memory()
        dst = torch.empty(n, dtype=torch.uint8, device=dev)
        times.append(
            time_call(
                lambda s=src, d=dst: d.copy_(s, non_blocking=True),
                lambda: torch.cuda.synchronize(dev),
            )
        )
    bw = (sizes[1] - sizes[0]) / max(times[1] - times[0], 1e-9)
    latency = max(times[0] - sizes[0] / bw, 0.0)
    return LinkProfile(host.name, gpu.name, bw, latency)
