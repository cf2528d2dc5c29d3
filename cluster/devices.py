"""What a cluster is made of: devices that compute and the links between them.

The bottom of hetero: frozen values, no torch, no Ray, nothing above this folder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DeviceKind = Literal["gpu", "cpu", "npu"]
DEVICE_KINDS: tuple[str, ...] = ("gpu", "cpu", "npu")


@dataclass(frozen=True)
class DeviceSpec:
    """One device that computes. Rates are peaks from the datasheet; calibration scales them."""

    name: str  # unique in the cluster: "<host>/<device>", e.g. "node0/gpu1"
    kind: str  # gpu | cpu | npu
    host: str  # the node (Ray node) that holds the device
    model: str = ""  # e.g. "NVIDIA H100 SXM5 80GB"
    peak_flops: tuple[tuple[str, float], ...] = ()  # (dtype, FLOP/s), dense
    mem_bandwidth: float = 0.0  # bytes/s of the device's own memory
    memory: float = 0.0  # bytes usable for weights and activations
    launch_overhead: float = 5e-6  # seconds per kernel launch / op dispatch
    dtypes: tuple[str, ...] = ("float32",)
    cores: int = 0  # CPU cores (threads the backend may use); 0 for accelerators
    index: int = 0  # the device's ordinal on its host (cuda:<index> for GPUs)
    emulated: bool = False  # runs on the host through TVM because no such device is present
    mcpu: str = ""  # LLVM -mcpu for CPU/NPU targets; "" lets TVM pick the host's

    def peak(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype`; else float32's, then float16's, then the slowest listed rate
        (never an integer rate for floating-point work: that would flatter the device)."""
        table = dict(self.peak_flops)
        for key in (dtype, "float32", "float16"):
            if key in table:
                return table[key]
        return min(table.values(), default=1e9)

    def supports_dtype(self, dtype: str) -> bool:
        return dtype in self.dtypes

    @property
    def short(self) -> str:
        return self.name.split("/", 1)[-1]


@dataclass(frozen=True)
class LinkSpec:
    """A bidirectional link between two devices (or two hosts' CPUs, for the network)."""

    a: str
    b: str
    bandwidth: float  # bytes/s, each direction
    latency: float  # seconds per transfer
    kind: str = "pcie"  # pcie | nvlink | network | memory
