"""How activations cross between stages.

GPU -> GPU (every reader a GPU, the caller not among them): NCCL tensor transport, the
tensors never leave the devices. Every other edge goes through Ray's shared-memory
channels (across nodes, Ray's object transfer); a GPU stage then moves its outputs to
host memory itself, so no reader needs CUDA to deserialize them.
"""

from __future__ import annotations

from collections.abc import Sequence

from hetero.runtime.stage import StageSpec


def all_gpu(stage: StageSpec, readers: Sequence[StageSpec], to_caller: bool) -> bool:
    return (
        stage.device.kind == "gpu"
        and not to_caller
        and bool(readers)
        and all(r.device.kind == "gpu" for r in readers)
    )


def host_out(stage: StageSpec, readers: Sequence[StageSpec], to_caller: bool) -> bool:
    """Whether the stage copies its outputs to host memory before sending them."""
    return not all_gpu(stage, readers, to_caller)


def edge_transport(stage: StageSpec, readers: Sequence[StageSpec], to_caller: bool) -> str | None:
    """The `with_tensor_transport` of the stage's output node (None: Ray's default channel)."""
    return "nccl" if all_gpu(stage, readers, to_caller) else None
