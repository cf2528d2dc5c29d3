"""Price each distinct block once: the 80 decoder layers of a LLaMA are one block to the
cost model, priced on one device of each class, not 80 x 144 times.

A group's price depends on its ops' cost-relevant facts (target, class, dtype, FLOPs, bytes,
parameters, launches, in order) and its boundary bytes, not on the ops' names; a device's
price on its spec up to name, the backend and the calibration entry that prices it.
`PricedOnce` wraps a CostModel and memoises `group_time` and `kernel_time` on those keys;
everything else passes through.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from hetero.cluster.spec import DeviceSpec
from hetero.partitioner.cost import CostModel


def op_key(op) -> tuple:
    """What the cost model reads of one op (its name aside)."""
    return (
        op.target,
        op.op_class,
        op.dtype,
        op.flops,
        op.bytes_read,
        op.bytes_written,
        op.param_bytes,
        op.launches,
    )


def block_key(group, ops: Sequence) -> tuple:
    """Equal for two groups that every cost-model formula prices alike."""
    return (
        group.bytes_in,
        group.bytes_out,
        group.param_bytes,
        group.dtype,
        tuple(op_key(op) for op in ops),
    )


def device_key(cost_model: CostModel, device: DeviceSpec, backend: str | None) -> tuple:
    """Equal for two devices that every cost-model formula prices alike: feedback corrects
    a device by its name, so two of one spec with different corrections differ."""
    entry = None
    if cost_model.profile is not None:
        dp = cost_model.profile.for_device(device, backend)
        entry = None if dp is None else cost_model.profile.devices.index(dp)
    corrections = tuple(sorted(cost_model.correction_table(device, backend).items()))
    return (replace(device, name="", host="", index=0), backend, entry, corrections)


class PricedOnce:
    """A CostModel whose group and kernel prices are computed once per (block, device) key."""

    def __init__(self, cost_model: CostModel) -> None:
        self.cost_model = cost_model
        self._memo: dict[tuple, float] = {}
        self._blocks: dict[str, tuple] = {}
        self._devices: dict[tuple[str, str | None], tuple] = {}
        self.hits = 0
        self.misses = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cost_model, name)

    def _remember(self, key: tuple, compute) -> float:
        hit = self._memo.get(key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        value = compute()
        self._memo[key] = value
        return value

    def _block(self, group, ops) -> tuple:
        """block_key, once per group (a group's name is unique in its GroupGraph)."""
        key = self._blocks.get(group.name)
        if key is None:
            key = self._blocks[group.name] = block_key(group, ops)
        return key

    def _device(self, device: DeviceSpec, backend: str | None) -> tuple:
        key = self._devices.get((device.name, backend))
        if key is None:
            key = self._devices[(device.name, backend)] = device_key(
                self.cost_model, device, backend
            )
        return key

    def group_time(self, group, ops, device, *, backend: str = "eager", scale: float = 1.0):
        key = ("group", self._block(group, ops), self._device(device, backend), scale)
        return self._remember(
            key,
            lambda: self.cost_model.group_time(group, ops, device, backend=backend, scale=scale),
        )

    def kernel_time(self, ops, device, *, scale: float = 1.0, backend: str | None = None):
        key = (
            "kernels",
            tuple(op_key(op) for op in ops),
            self._device(device, backend),
            scale,
        )
        return self._remember(
            key, lambda: self.cost_model.kernel_time(ops, device, scale=scale, backend=backend)
        )
