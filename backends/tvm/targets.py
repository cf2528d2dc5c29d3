"""TVM targets from hetero's device descriptions.

CPUs and (emulated) NPUs compile for LLVM: `-mcpu` from `DeviceSpec.mcpu` or this host's CPU,
`num-cores` from `DeviceSpec.cores` (the thread pool size the worker uses at load). GPUs
compile for CUDA with the SM architecture from the options (`TVMOptions.arch`, e.g. sm_90)
or guessed from the device's model name.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

from hetero.backends.base import CompileOptions
from hetero.backends.tvm.options import TVMOptions
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ConfigError

# GPU model name fragment -> CUDA SM architecture, most specific first.
_SM_BY_MODEL = (
    ("B200", "sm_100"),
    ("H200", "sm_90"),
    ("H100", "sm_90"),
    ("GH200", "sm_90"),
    ("L40", "sm_89"),
    ("L4", "sm_89"),
    ("4090", "sm_89"),
    ("A100", "sm_80"),
    ("A10", "sm_86"),
    ("3090", "sm_86"),
    ("A6000", "sm_86"),
    ("T4", "sm_75"),
    ("V100", "sm_70"),
)


@functools.cache
def host_mcpu() -> str:
    # optional (hetero[tvm]): loaded on first use
    from tvm.target.codegen import llvm_get_system_cpu

    return str(llvm_get_system_cpu())


def threads_for(device: DeviceSpec) -> int:
    """Threads a CPU/NPU artifact runs with: the device's cores, else this host's."""
    return device.cores if device.cores > 0 else (os.cpu_count() or 1)


def target_config(device: DeviceSpec, options: CompileOptions) -> dict[str, Any]:
    """The JSON-dict form TVM 0.27 takes (its CLI string form is gone)."""
    own = TVMOptions.parse(options, "tvm")
    if device.kind in ("cpu", "npu"):
        return {
            "kind": "llvm",
            "mcpu": own.mcpu or device.mcpu or host_mcpu(),
            "num-cores": threads_for(device),
        }
    if device.kind == "gpu":
        arch = own.arch or _sm_for(device)
        return {"kind": "cuda", "arch": arch}
    raise ConfigError(f"TVM cannot target device {device.name!r} of kind {device.kind!r}")


def target_string(device: DeviceSpec, options: CompileOptions) -> str:
    return json.dumps(target_config(device, options), sort_keys=True)


def make_target(device: DeviceSpec, options: CompileOptions):
    import tvm  # optional (hetero[tvm]): loaded on first use

    cfg = target_config(device, options)
    if cfg["kind"] == "cuda":
        return tvm.target.Target(cfg, host={"kind": "llvm"})
    return tvm.target.Target(cfg)


def _sm_for(device: DeviceSpec) -> str:
    for frag, sm in _SM_BY_MODEL:
        if frag.lower() in device.model.lower():
            return sm
    raise ConfigError(
        f"cannot tell the CUDA architecture of {device.name} (model {device.model!r}). "
        'Pass CompileOptions(extra=(("arch", "sm_90"),)) or name the GPU model in the cluster file.'
    )
