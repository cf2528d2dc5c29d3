"""CostModel: predicted seconds for op groups on devices and for transfers between devices.

Roofline per op (or per fused group), scaled by measured efficiency:

    t = max(FLOPs / (peak(dtype) * e_compute), bytes / (bandwidth * e_memory)) + launches * overhead

An unfused backend (eager) pays this per op, reading and writing every intermediate (on a
GPU the host's dispatch overlaps the kernels it queued: the slower side counts, see
`queued_time`); a
fusing backend (tvm, triton, inductor) pays it once per group (`fused_terms`): compute adds
up per op, memory counts only the bytes that cross the group's boundary (`Group.fused_bytes`),
and each anchor op (matmul, conv, attention, norm, reduction; elementwise ops fuse into them)
is one kernel paying its class's overhead. View ops cost nothing on a fusing backend; in
eager each still pays a Python dispatch (`view_overhead`). Calling a partition costs
`call_overhead` once (for a compiled one: argument conversion and entering its VM).

Transfers cost latency + bytes / bandwidth along the cluster's route
(`ClusterSpec.transfer_time`), or along a measured link when the profile has one.

Efficiency factors (e_compute, e_memory) and overheads come from a calibration profile
written by `hetero calibrate` (JSON, see `CalibrationProfile`). Its entries are keyed by
(device, backend), since the same op costs different times as eager torch, a TVM kernel or a
Triton one: looked up per device by name, then by model string, then by kind, measured
through the backend the planner runs there first (through another one only when there is no
such entry), and per op class as "class/dtype" then "class". Without a profile these
defaults apply (fractions of the datasheet peaks in the cluster file):

    kind  op class     compute  memory
    cpu   matmul        0.50     0.60      conv 0.40/0.60, attention 0.30/0.60
    cpu   norm          0.20     0.50      reduction 0.20/0.50, elementwise 0.20/0.60
    cpu   transcendental 0.02    0.60      (tanh, exp, erf, gelu, ...: elementwise ops
    cpu   data          0.10     0.40       whose one counted FLOP is tens of instructions)
    gpu   matmul        0.60     0.70      conv 0.50/0.70, attention 0.40/0.70
    gpu   norm          0.30     0.70      reduction 0.30/0.70, elementwise 0.30/0.70
    gpu   transcendental 0.10    0.70
    gpu   data          0.20     0.50
    npu   matmul        0.40     0.50      conv 0.40/0.50, attention 0.20/0.50
    npu   others        0.10     0.40

and a view op's dispatch costs a quarter of a launch, calling one partition two launches
(`call_overhead`; the plan adds it once per partition).

Feedback (calibration/feedback.py folds what running deployments measured into the
profile): a group's time is multiplied by its correction, looked up per (device, backend)
by the group's main op class and shape bucket (`group_key`: log4 of its roofline
microseconds at the datasheet peaks), then by class, then over all classes; the partition
call by its own correction. The executor the plan runs on (`CostModel.executor`) adds its
measured per-stage work to each partition's call and its per-hop cost (a Ray channel's
write and pickling) to each transfer between devices; until a run has measured them, an
executor's terms are `default_runtime`'s. Where the executor's workers are processes apart
from the caller (Ray), the caller's inputs and outputs pay a hop too (`caller_hop`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from hetero.cluster.profile import (
    ALL_CLASSES,
    CALL,
    CalibrationProfile,
    DeviceProfile,
    Efficiency,
    RuntimeProfile,
    default_profile_path,
)
from hetero.cluster.spec import ClusterSpec, DeviceSpec
from hetero.partitioner.decisions import ExecutorKind

if TYPE_CHECKING:
    from hetero.partitioner.coarsen import Group
    from hetero.partitioner.graph import OpNode

ANCHOR_CLASSES = frozenset({"matmul", "conv", "attention", "norm", "reduction"})

_CPU = {
    "matmul": (0.5, 0.6),
    "conv": (0.4, 0.6),
    "attention": (0.3, 0.6),
    "norm": (0.2, 0.5),
    "reduction": (0.2, 0.5),
    "elementwise": (0.2, 0.6),
    "transcendental": (0.02, 0.6),
    "data": (0.1, 0.4),
}
_GPU = {
    "matmul": (0.6, 0.7),
    "conv": (0.5, 0.7),
    "attention": (0.4, 0.7),
    "norm": (0.3, 0.7),
    "reduction": (0.3, 0.7),
    "elementwise": (0.3, 0.7),
    "transcendental": (0.1, 0.7),
    "data": (0.2, 0.5),
}
_NPU = {
    "matmul": (0.4, 0.5),
    "conv": (0.4, 0.5),
    "attention": (0.2, 0.5),
    "norm": (0.1, 0.4),
    "reduction": (0.1, 0.4),
    "elementwise": (0.1, 0.4),
    "transcendental": (0.02, 0.4),
    "data": (0.1, 0.4),
}
DEFAULT_EFFICIENCY: Mapping[str, Mapping[str, tuple[float, float]]] = {
    "cpu": _CPU,
    "gpu": _GPU,
    "npu": _NPU,
}
DEFAULT_VIEW_FRACTION = 0.25  # a view op's eager dispatch, as a fraction of a launch
DEFAULT_CALL_FRACTION = 2.0  # calling one partition, as a multiple of a launch
# Elementwise ops that evaluate a transcendental function: one FLOP per element in the
# graph's count, tens of instructions in fact; priced by their own efficiency.
TRANSCENDENTAL = frozenset(
    {
        "gelu", "tanh", "exp", "exp2", "expm1", "erf", "erfinv", "sigmoid", "silu", "log",
        "log1p", "log2", "pow", "sqrt", "rsqrt", "sin", "cos", "tan", "atan", "softplus",
        "elu", "mish", "hardswish", "logit",
    }
)  # fmt: skip


# Ops that read only the rows their indices pick: a 4-token lookup in a 131 MB embedding
# table reads 16 KB of it, not the table.
GATHERS = frozenset({"embedding", "index_select", "index", "gather", "take", "embedding_bag"})


def _base(op: OpNode) -> str:
    parts = op.target.split(".")
    return (parts[1] if len(parts) > 1 and parts[0] == "aten" else parts[0]).rstrip("_")


def weight_bytes_read(op: OpNode) -> int:
    """Bytes of its weights an op reads when it runs (its `param_bytes` are what it owns,
    which is what memory counts): a gather's rows, about its output's size."""
    if op.param_bytes and _base(op) in GATHERS:
        return min(op.param_bytes, op.bytes_written)
    return op.param_bytes


def cost_class(op: OpNode) -> str:
    """The op's class for pricing: its op class, with transcendental elementwise ops apart."""
    if op.op_class == "elementwise" and _base(op) in TRANSCENDENTAL:
        return "transcendental"
    return op.op_class


@dataclass(frozen=True)
class FusedTerms:
    """What the cost of a group on a fusing backend depends on (calibration fits these)."""

    flops: tuple[tuple[str, str, float], ...]  # (cost class, dtype, FLOPs) per non-view op
    act_bytes: float  # activation bytes crossing the group's boundary
    param_bytes: float
    main: str  # the class whose memory efficiency prices the boundary bytes
    dtype: str
    kernels: tuple[tuple[str, int], ...]  # (cost class, count) of the kernels launched


def fused_terms(group: Group, ops: Sequence[OpNode]) -> FusedTerms | None:
    """The group as one fused unit: None when it holds only views (they fuse into nothing)."""
    real = [op for op in ops if op.op_class != "view"]
    if not real:
        return None
    by_class: dict[str, int] = {}
    kernels: dict[str, int] = {}
    for op in real:
        by_class[op.op_class] = by_class.get(op.op_class, 0) + 1
        if op.op_class in ANCHOR_CLASSES:
            kernels[op.op_class] = kernels.get(op.op_class, 0) + op.launches
    main = max(by_class, key=lambda c: (c in ANCHOR_CLASSES, by_class[c]))
    if not kernels:
        # elementwise ops alone: one fused kernel, priced as its costliest class
        cls = "transcendental" if any(cost_class(op) == "transcendental" for op in real) else main
        kernels[cls] = 1
    unread = sum(op.param_bytes - weight_bytes_read(op) for op in real)
    return FusedTerms(
        flops=tuple((cost_class(op), op.dtype, float(op.flops)) for op in real),
        act_bytes=float(group.fused_bytes - group.param_bytes),
        param_bytes=float(group.param_bytes - unread),
        main=main,
        dtype=group.dtype,
        kernels=tuple(kernels.items()),
    )


def main_class(group: Group) -> str:
    """The op class a group is priced and corrected as: its commonest anchor class (matmul,
    conv, attention, norm, reduction), else its commonest class ("view": views only)."""
    classes = [c for c, _ in group.op_classes]
    return next((c for c in classes if c in ANCHOR_CLASSES), classes[0] if classes else "view")


def shape_bucket(group: Group, device: DeviceSpec, scale: float = 1.0) -> int:
    """log4 of the group's roofline microseconds at the datasheet peaks of `device` (0 for
    a microsecond or less): groups of one class a bucket apart differ 4x in work, and a
    kernel's efficiency depends on its size (overhead-bound, cache-bound, compute-bound).
    Independent of any profile, so a correction keeps its key when factors change."""
    flops = group.flops * scale
    nbytes = (group.fused_bytes - group.param_bytes) * scale + group.param_bytes
    t = max(flops / device.peak(group.dtype), nbytes / (device.mem_bandwidth or 1e10))
    return max(0, math.floor(math.log(max(t, 1e-12) / 1e-6, 4)))


def group_key(group: Group, device: DeviceSpec, scale: float = 1.0) -> tuple[str, int]:
    """(main op class, shape bucket): what a feedback correction of `group` is keyed by."""
    return main_class(group), shape_bucket(group, device, scale)


# What Ray adds around the partitions before any run has measured it (feedback replaces
# both with the medians it measures). A generation over Ray calls each stage's actor from the
# driver, and a stage's inputs reach it through the driver: benchmarks/ray_decode_pricing.py
# on the 2-core development box measured 1.2-1.9 ms from a producer's values being ready to
# the next worker's stage starting (the caller's inputs alike), and 0.02-0.04 ms per stage
# in the worker around its runner's call.
RAY_STAGE_OVERHEAD = 30e-6
RAY_HOP_OVERHEAD = 1.2e-3


# How much longer a split layer's CPU rows take inside a decode step than the calibration
# measures them alone (`RuntimeProfile.split_cpu`), before a run of this machine measures
# its own: on every GPU host measured so far they ran slower, never faster (BENCHMARKS.md:
# H200 run 19 +32%, run 26 about +100%; H100 run 31 +11%, run 34 +22-28%, run 36 +46% timed
# on the GPU's timeline), the median about +30%. Priced at zero, run 36's first plan split
# every layer that did not fit (81.7 ms priced, 115.8 measured) and only a feedback round
# found the plan that ran 100.7; priced with this prior the same rates choose that plan's
# layout (`plan_capped_cpu.py --run ...run36... --split-cpu 0.3`: 12 CPU, 5 split, 8
# streamed layers, 91.6 ms). Feedback replaces it, up or down.
SPLIT_CPU_PRIOR = 0.3


def default_runtime(executor: ExecutorKind) -> RuntimeProfile:
    """The runtime terms `executor` is priced with until a run measures its own: in process
    nothing (a partition's call is the runner's), over Ray its actor calls; for either, a
    split layer's CPU rows at `SPLIT_CPU_PRIOR` beyond their calibrated time."""
    ray = executor is ExecutorKind.RAY
    return RuntimeProfile(
        executor,
        stage_overhead=RAY_STAGE_OVERHEAD if ray else 0.0,
        hop_overhead=RAY_HOP_OVERHEAD if ray else 0.0,
        split_cpu=SPLIT_CPU_PRIOR,
    )


# ---- the cost model ------------------------------------------------------------------------


@dataclass(frozen=True)
class CostModel:
    """Predicts seconds. Pure: no torch, no measurements (those are `hetero calibrate`'s)."""

    profile: CalibrationProfile | None = None
    # Backends that fuse a group into few kernels: each backend declares it (`Backend.fuses`)
    # and the planner fills this in from the registry it is given (`adapter.with_fusing`).
    fusing_backends: frozenset[str] = frozenset()
    # The runtime the plan runs on, whose measured per-stage and per-hop costs the
    # profile's `runtime` entries hold (`default_runtime` until measured).
    executor: ExecutorKind = ExecutorKind.LOCAL
    # (backend, "name:<device>" or "model:<model>") -> key -> factor, from profile.corrections
    _corrections: Mapping[tuple[str, str], Mapping[str, float]] = field(
        default=None, init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not isinstance(self.executor, ExecutorKind):  # a person's CostModel(executor="ray")
            object.__setattr__(self, "executor", ExecutorKind(self.executor))
        index: dict[tuple[str, str], dict[str, float]] = {}
        for c in self.profile.corrections if self.profile is not None else ():
            index.setdefault((c.backend, f"name:{c.device}"), {})[c.key] = c.factor
            if c.model:
                index.setdefault((c.backend, f"model:{c.model}"), {}).setdefault(c.key, c.factor)
        object.__setattr__(self, "_corrections", index)

    def base(self) -> CostModel:
        """This model without feedback: the microbenchmarks' factors alone (what measured
        runs are compared with when corrections are fitted)."""
        if self.profile is None or (not self.profile.corrections and not self.profile.runtime):
            return self
        return replace(self, profile=self.profile.without_feedback())

    # ---- feedback --------------------------------------------------------------------------
    def correction(self, device: DeviceSpec, backend: str | None, key: tuple[str, int]) -> float:
        """The measured / predicted factor for groups of `key` (group_key) on `device`."""
        table = self._correction_table(device, backend)
        if not table:
            return 1.0
        cls, bucket = key
        for k in (f"{cls}@{bucket}", cls, ALL_CLASSES):
            if k in table:
                return table[k]
        return 1.0

    def correction_table(self, device: DeviceSpec, backend: str | None) -> Mapping[str, float]:
        """key -> factor of the feedback corrections that price `device` through `backend`
        (by the device's name, else its model; empty without feedback)."""
        return self._correction_table(device, backend)

    def _correction_table(self, device: DeviceSpec, backend: str | None) -> Mapping[str, float]:
        if not self._corrections:
            return {}
        if backend is None:
            dp = self._device(device, None)
            backend = dp.backend if dp is not None else "eager"
        return self._corrections.get((backend, f"name:{device.name}")) or (
            self._corrections.get((backend, f"model:{device.model}"), {}) if device.model else {}
        )

    def runtime(self) -> RuntimeProfile:
        """What the executor adds around partitions: as measured, else `default_runtime`."""
        measured = self.profile.runtime_for(self.executor) if self.profile is not None else None
        return measured if measured is not None else default_runtime(self.executor)

    def stage_overhead(self) -> float:
        """Seconds the executor spends per stage around the partition's call."""
        return self.runtime().stage_overhead

    def split_handoff(self) -> float:
        """Seconds a split layer's hand-off costs beyond its priced copies and op call."""
        return self.runtime().split_handoff

    def split_cpu(self) -> float:
        """Seconds a split layer's CPU rows take per second of their calibrated time, beyond it."""
        return self.runtime().split_cpu

    def stream_call(self) -> float:
        """Seconds a streamed piece's call costs beyond its priced call (measured)."""
        return self.runtime().stream_call

    def hop_overhead(self) -> float:
        """Seconds a hop between two devices' workers costs beyond the link's time."""
        return self.runtime().hop_overhead

    def caller_hop(self) -> float:
        """Seconds the caller's inputs take into a worker on the caller's own host, and its
        outputs out of it: a hop where the caller is a process apart (Ray's driver), nothing
        in process."""
        return self.hop_overhead() if self.executor.caller_apart else 0.0

    @classmethod
    def load(cls, path: str | Path | None = None, cluster: ClusterSpec | None = None) -> CostModel:
        """From a profile file, else the cached profile of `cluster`, else the defaults."""
        if path is not None:
            return cls(CalibrationProfile.load(path))
        if cluster is not None:
            cached = default_profile_path(cluster.name)
            if cached.exists():
                return cls(CalibrationProfile.load(cached))
        return cls()

    # ---- factors ---------------------------------------------------------------------------
    # Every lookup takes the backend the device runs (None: the first entry measured for the
    # device, whichever backend that was); the planner passes the one it resolved per device.
    def _device(self, device: DeviceSpec, backend: str | None) -> DeviceProfile | None:
        return self.profile.for_device(device, backend) if self.profile else None

    def efficiency(
        self, device: DeviceSpec, op_class: str, dtype: str, backend: str | None = None
    ) -> tuple[float, float]:
        """(compute, memory) efficiency of `op_class` in `dtype` on `device` via `backend`."""
        e = self._entry(device, op_class, dtype, backend)
        if e is not None:
            return e.compute, e.memory
        defaults = DEFAULT_EFFICIENCY.get(device.kind, _CPU)
        return defaults.get(op_class, defaults["elementwise"])

    def measured(
        self, device: DeviceSpec, op_class: str, dtype: str, backend: str | None = None
    ) -> bool:
        """Whether the profile has an entry for exactly this class and dtype."""
        dp = self._device(device, backend)
        return dp is not None and any(e.key == f"{op_class}/{dtype}" for e in dp.efficiency)

    def _entry(
        self, device: DeviceSpec, op_class: str, dtype: str, backend: str | None = None
    ) -> Efficiency | None:
        dp = self._device(device, backend)
        if dp is None:
            return None
        table = {e.key: e for e in dp.efficiency}
        for key in (f"{op_class}/{dtype}", op_class):
            if key in table:
                return table[key]
        return None

    def op_overhead(
        self,
        device: DeviceSpec,
        op_class: str,
        dtype: str = "float32",
        backend: str | None = None,
    ) -> float:
        """Seconds one op (eager) or one kernel (fusing backend) of `op_class` costs on top of
        its roofline time."""
        e = self._entry(device, op_class, dtype, backend)
        dp = self._device(device, backend)
        # another backend's entry (the fallback) measured another runner's dispatch
        extra = dp.runner_overhead if dp is not None and backend in (None, dp.backend) else 0.0
        if e is not None and e.overhead is not None:
            return e.overhead + extra
        return self.launch_overhead(device, backend) + extra

    def launch_overhead(self, device: DeviceSpec, backend: str | None = None) -> float:
        dp = self._device(device, backend)
        if dp is not None and dp.launch_overhead is not None:
            return dp.launch_overhead
        return device.launch_overhead

    def view_overhead(self, device: DeviceSpec, backend: str | None = None) -> float:
        dp = self._device(device, backend)
        if dp is not None and dp.view_overhead is not None:
            return dp.view_overhead
        return DEFAULT_VIEW_FRACTION * self.launch_overhead(device, backend)

    def call_overhead(self, device: DeviceSpec, backend: str | None = None) -> float:
        """Seconds to run one partition besides its ops: calling it (its module, or its
        compiled artifact's runner: argument conversion, VM entry; corrected by feedback)
        and the executor's work around the call (`stage_overhead`)."""
        return (
            self.runner_call(device, backend) * self._call_correction(device, backend)
            + self.stage_overhead()
        )

    def runner_call(self, device: DeviceSpec, backend: str | None = None) -> float:
        """Seconds to call one partition's runner, as calibrated (no feedback, no executor)."""
        dp = self._device(device, backend)
        if dp is not None and dp.call_overhead is not None:
            return dp.call_overhead
        return DEFAULT_CALL_FRACTION * self.launch_overhead(device, backend)

    def _call_correction(self, device: DeviceSpec, backend: str | None) -> float:
        return self._correction_table(device, backend).get(CALL, 1.0)

    def fuses(self, backend: str) -> bool:
        return backend in self.fusing_backends

    # ---- compute ---------------------------------------------------------------------------
    def roofline(
        self,
        device: DeviceSpec,
        op_class: str,
        dtype: str,
        flops: float,
        nbytes: float,
        backend: str | None = None,
    ) -> float:
        """Seconds of pure compute/memory time, launches excluded."""
        ec, em = self.efficiency(device, op_class, dtype, backend)
        t_c = flops / (device.peak(dtype) * ec) if flops else 0.0
        bw = device.mem_bandwidth or 1e10
        t_m = nbytes / (bw * em) if nbytes else 0.0
        return max(t_c, t_m)

    def op_time(
        self, op: OpNode, device: DeviceSpec, scale: float = 1.0, backend: str | None = None
    ) -> float:
        """One op run alone (unfused). `scale` shrinks activations (a microbatch of 1/scale)."""
        if op.op_class == "view":
            return self.view_overhead(device, backend)
        t = self.op_roofline(op, device, scale, backend)
        return t + op.launches * self.op_overhead(device, cost_class(op), op.dtype, backend)

    def op_roofline(
        self, op: OpNode, device: DeviceSpec, scale: float = 1.0, backend: str | None = None
    ) -> float:
        """One op's compute/memory time alone, launches excluded (its activations scaled)."""
        act = op.bytes_read - op.param_bytes + op.bytes_written
        nbytes = act * scale + weight_bytes_read(op)
        return self.roofline(device, cost_class(op), op.dtype, op.flops * scale, nbytes, backend)

    def group_time(
        self,
        group: Group,
        ops: Sequence[OpNode],
        device: DeviceSpec,
        *,
        backend: str = "eager",
        scale: float = 1.0,
    ) -> float:
        """A group of ops on `device` through `backend` (fused when the backend fuses).

        Fused: compute adds up per op (each at its class's efficiency), memory is the
        group's boundary bytes at its main class's efficiency, and each anchor op is one
        kernel paying its class's overhead (a group of elementwise ops only: one kernel).
        This is the form `hetero calibrate` fits a fusing backend's factors in; feedback
        then corrects the whole (`correction`)."""
        t = self._group_time(group, ops, device, backend=backend, scale=scale)
        if t and self._corrections:
            t *= self.correction(device, backend, group_key(group, device, scale))
        return t

    def _group_time(
        self,
        group: Group,
        ops: Sequence[OpNode],
        device: DeviceSpec,
        *,
        backend: str,
        scale: float,
    ) -> float:
        if not self.fuses(backend):
            if device.kind == "gpu":
                return self.queued_time(ops, device, scale=scale, backend=backend)
            factor = self.sequence_factor(device, backend)
            return factor * sum(self.op_time(op, device, scale, backend) for op in ops)
        terms = fused_terms(group, ops)
        if terms is None:
            return 0.0
        return self.sequence_factor(device, backend) * self.fused_time(
            device, terms, backend=backend, scale=scale
        )

    def queued_time(
        self,
        ops: Sequence[OpNode],
        device: DeviceSpec,
        *,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> float:
        """Unfused ops on an asynchronous device (a GPU): the host dispatches each op (the
        backend's per-op cost, views included) and queues its kernels, which the device runs
        while the host dispatches the next ones. The slower side sets the time: small ops
        (decode) are dispatch-bound, large ones (prefill) kernel-bound, and a sum of the two
        would count the overlap twice. Device side per kernel: its roofline plus the
        cluster file's `launch_overhead` (the gap between kernels queued back to back)."""
        host = self.sequence_factor(device, backend) * self.dispatch_time(ops, device, backend)
        return max(host, self.kernel_time(ops, device, scale=scale, backend=backend))

    def kernel_time(
        self,
        ops: Sequence[OpNode],
        device: DeviceSpec,
        *,
        scale: float = 1.0,
        backend: str | None = None,
    ) -> float:
        """The device's side of unfused ops queued back to back: each kernel's roofline plus
        the cluster file's `launch_overhead` (the gap between queued kernels)."""
        return sum(
            self.op_roofline(op, device, scale, backend) + op.launches * device.launch_overhead
            for op in ops
            if op.op_class != "view"
        )

    def dispatch_time(
        self, ops: Sequence[OpNode], device: DeviceSpec, backend: str | None = None
    ) -> float:
        """The host's time to dispatch `ops` one by one (per-op overheads, views included),
        before the whole-block factor calibration measures (`sequence_factor`)."""
        host = 0.0
        for op in ops:
            if op.op_class == "view":
                host += self.view_overhead(device, backend)
            else:
                cls = cost_class(op)
                host += max(1, op.launches) * self.op_overhead(device, cls, op.dtype, backend)
        return host

    def sequence_factor(self, device: DeviceSpec, backend: str | None = None) -> float:
        """How much slower a group runs inside a partition than its parts alone (measured
        on whole blocks; for eager on a GPU it scales the host's dispatch only)."""
        dp = self._device(device, backend)
        return dp.sequence_factor if dp is not None else 1.0

    def fused_time(
        self, device: DeviceSpec, terms: FusedTerms, *, backend: str, scale: float = 1.0
    ) -> float:
        """Seconds of one fused group described by `terms` (see `fused_terms`)."""
        t_compute = 0.0
        for cls, dtype, flops in terms.flops:
            ec, _ = self.efficiency(device, cls, dtype, backend)
            t_compute += flops * scale / (device.peak(dtype) * ec)
        _, em = self.efficiency(device, terms.main, terms.dtype, backend)
        nbytes = terms.act_bytes * scale + terms.param_bytes
        t_memory = nbytes / ((device.mem_bandwidth or 1e10) * em)
        overhead = sum(
            n * self.op_overhead(device, cls, terms.dtype, backend) for cls, n in terms.kernels
        )
        return max(t_compute, t_memory) + overhead

    # ---- transfers -------------------------------------------------------------------------
    def transfer_time(self, cluster: ClusterSpec, src: str, dst: str, nbytes: float) -> float:
        """Seconds to move `nbytes` from device `src` to device `dst`: from one device's
        worker to another's (the executor's hop). Within one worker, `link_time`."""
        if src == dst or nbytes <= 0:
            return 0.0
        return self.link_time(cluster, src, dst, nbytes) + self.hop_overhead()

    def link_time(
        self,
        cluster: ClusterSpec,
        src: str,
        dst: str,
        nbytes: float,
        beside: str | None = None,
    ) -> float:
        """The link's part of a transfer: latency + bytes / bandwidth (no executor hop).
        `beside`: the dtype the host CPU computes in from host memory meanwhile ("": some
        dtype), which the link's rate measured so prices where the profile has one; None:
        the link alone."""
        if src == dst or nbytes <= 0:
            return 0.0
        # A measured link describes the cluster it was measured on; another cluster file
        # (say the same box with a PCIe Gen3 link) prices its own links.
        if self.profile is not None and self.profile.cluster in ("", cluster.name):
            lp = self.profile.link(src, dst)
            if lp is not None:
                rate = lp.bandwidth if beside is None else lp.shared_rate(beside)
                return lp.latency + nbytes / rate
        return cluster.transfer_time(src, dst, nbytes)

    def stream_time(
        self, cluster: ClusterSpec, device: DeviceSpec, nbytes: float, beside: str | None = None
    ) -> float:
        """Seconds to copy `nbytes` of weights from the host's memory to `device`; `beside`
        as in `link_time` (decode's split rows and CPU layers run beside the copies;
        prefill's streamed layers copy alone: an H100 host's 25 of them priced at the shared
        44 GB/s took 270 ms, measured 193)."""
        host = cluster.host_cpu(device.host)
        if host is None or host.name == device.name:
            return 0.0
        # a copy engine's work, not a hop between workers: no executor overhead
        return self.link_time(cluster, host.name, device.name, nbytes, beside)
