"""Discover devices: this machine (`local_devices`) or a running Ray cluster (`ray_devices`).

Peak rates of GPUs come from a table of datasheet numbers keyed by the name CUDA
reports; CPU peaks are estimated from the core count and SIMD width. `hetero
calibrate` measures the real efficiency on top of these peaks.
"""

from __future__ import annotations

import os
import platform
import socket
from typing import NamedTuple

from hetero.cluster.connect import init_ray
from hetero.cluster.devices import DeviceSpec, LinkSpec


class Discovered(NamedTuple):
    """What discovery found: `ClusterSpec(*found)` builds the cluster."""

    name: str
    devices: tuple[DeviceSpec, ...]
    links: tuple[LinkSpec, ...]


# Dense peaks from NVIDIA datasheets (no sparsity); bandwidth of HBM; per-direction host link.
# H100 SXM5: https://www.nvidia.com/en-us/data-center/h100/ (67 TF fp32, 989 TF fp16/bf16, 3.35 TB/s)
# H200: https://www.nvidia.com/en-us/data-center/h200/ (same compute, 4.8 TB/s)
# A100 80GB SXM: https://www.nvidia.com/en-us/data-center/a100/ (19.5 TF fp32, 312 TF fp16, 2.04 TB/s)
_GPU_TABLE: dict[str, dict[str, float]] = {
    "H100": {"float32": 67e12, "float16": 989e12, "bfloat16": 989e12, "bw": 3.35e12, "pcie": 64e9},
    "H200": {"float32": 67e12, "float16": 989e12, "bfloat16": 989e12, "bw": 4.8e12, "pcie": 64e9},
    "A100": {
        "float32": 19.5e12,
        "float16": 312e12,
        "bfloat16": 312e12,
        "bw": 2.04e12,
        "pcie": 32e9,
    },
    "L4": {"float32": 30e12, "float16": 121e12, "bfloat16": 121e12, "bw": 0.3e12, "pcie": 32e9},
}


def _cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _mem_total() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return float(line.split()[1]) * 1024
    except OSError:
        pass
    return 8 * 2**30


def _cpu_flops_per_cycle() -> int:
    # FP32 FLOPs per core per cycle: two FMA ports x lanes x 2.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        flags = ""
    if "avx512f" in flags:
        return 64
    if "avx2" in flags or platform.machine() in ("arm64", "aarch64"):
        return 32
    return 16


def cpu_device(host: str, cores: int | None = None, memory: float | None = None) -> DeviceSpec:
    cores = cores or _cpu_cores()
    fp32 = cores * 2.5e9 * _cpu_flops_per_cycle()
    return DeviceSpec(
        name=f"{host}/cpu",
        kind="cpu",
        host=host,
        model=platform.processor() or platform.machine(),
        peak_flops=(("bfloat16", fp32), ("float16", fp32 / 4), ("float32", fp32)),
        # Per-core streaming bandwidth is ~10 GB/s on servers; a socket saturates near 100.
        mem_bandwidth=min(10e9 * cores, 100e9),
        memory=memory or _mem_total() * 0.8,
        launch_overhead=10e-6,
        dtypes=("float32", "bfloat16", "float16"),
        cores=cores,
    )


def gpu_device(host: str, index: int, name: str, memory: float) -> DeviceSpec:
    row = next((v for k, v in _GPU_TABLE.items() if k in name), None)
    if row is None:  # unknown card: a modest guess; calibration corrects it
        row = {"float32": 20e12, "float16": 100e12, "bfloat16": 100e12, "bw": 1e12, "pcie": 25e9}
    return DeviceSpec(
        name=f"{host}/gpu{index}",
        kind="gpu",
        host=host,
        model=name,
        peak_flops=tuple((k, row[k]) for k in ("bfloat16", "float16", "float32")),
        mem_bandwidth=row["bw"],
        memory=memory * 0.9,
        launch_overhead=5e-6,
        dtypes=("float32", "float16", "bfloat16"),
        index=index,
    )


def local_devices(include_gpus: bool = True, host: str | None = None) -> Discovered:
    """This machine's CPU and, when torch sees CUDA, its GPUs."""
    host = host or "local"
    cpu = cpu_device(host)
    devices = [cpu]
    links: list[LinkSpec] = []
    if include_gpus:
        try:
            # torch is heavy and only this probe needs it: imported here, on first use, so
            # that the cluster description imports without it
            import torch

            if torch.cuda.is_available():
                for i in range(torch.cuda.device_count()):
                    p = torch.cuda.get_device_properties(i)
                    gpu = gpu_device(host, i, p.name, float(p.total_memory))
                    devices.append(gpu)
                    row = next((v for k, v in _GPU_TABLE.items() if k in p.name), {"pcie": 25e9})
                    links.append(LinkSpec(gpu.name, cpu.name, row["pcie"], 10e-6, "pcie"))
        except ImportError:
            pass
    return Discovered(f"local ({socket.gethostname()})", tuple(devices), tuple(links))


def ray_devices(address: str | None = None) -> Discovered:
    """One host per alive Ray node: `CPU` -> a cpu device, `GPU` -> gpus, `NPU` -> emulated npus."""
    import ray  # optional (hetero[ray]) and heavy: only discovery over Ray needs it

    init_ray(address or "auto")  # connects unless this process runs Ray already
    devices: list[DeviceSpec] = []
    links: list[LinkSpec] = []
    cpus: list[str] = []
    for node in sorted(ray.nodes(), key=lambda n: n["NodeID"]):
        if not node.get("Alive"):
            continue
        res = node.get("Resources", {})
        host = f"node-{node['NodeID'][:8]}"
        cpu = cpu_device(
            host, cores=int(res.get("CPU", 1)), memory=float(res.get("memory", 0)) or None
        )
        devices.append(cpu)
        cpus.append(cpu.name)
        for i in range(int(res.get("GPU", 0))):
            gpu = gpu_device(host, i, str(res.get("accelerator_type", "GPU")), 80e9)
            devices.append(gpu)
            links.append(LinkSpec(gpu.name, cpu.name, 25e9, 10e-6, "pcie"))
        for i in range(int(res.get("NPU", 0))):
            npu = DeviceSpec(
                name=f"{host}/npu{i}",
                kind="npu",
                host=host,
                model="emulated NPU",
                peak_flops=(("float16", cpu.peak("float32")), ("int8", 2 * cpu.peak("float32"))),
                mem_bandwidth=cpu.mem_bandwidth,
                memory=4 * 2**30,
                dtypes=("float16", "int8", "float32"),
                index=i,
                emulated=True,
            )
            devices.append(npu)
            links.append(LinkSpec(npu.name, cpu.name, 8e9, 20e-6, "chip"))
    for i, a in enumerate(cpus):
        for b in cpus[i + 1 :]:
            links.append(LinkSpec(a, b, 1.25e9, 100e-6, "network"))
    return Discovered("ray", tuple(devices), tuple(links))
