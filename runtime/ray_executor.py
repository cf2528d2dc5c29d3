"""The Ray executor: one actor per device, a compiled graph between them, faults handled.

Lifecycle: place one `DeviceWorker` actor per device on the node that holds it, wait
until each has loaded its artifacts, compile the graph. Per request: execute, wait at
most `timeout_s`. A stage's own exception reaches the caller as a WorkerError and the
graph keeps serving. A dead actor, a broken channel or a deadline tears the graph down;
the executor waits up to `restart_timeout_s` for the actors (Ray restarts them,
`max_restarts`, and they reload their artifacts), compiles a new graph and retries the
request `retries` times. Devices that do not come back are handed to the `replan`
hook, and the executor switches to the stages it returns. With an `online` re-planner
(runtime/online.py) it also switches, between requests, to the plans measured stage times
call for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import ClusterSpec
from hetero.errors import ConfigError, WorkerError
from hetero.partitioner.plan import Plan
from hetero.runtime import dag, faults, placement
from hetero.runtime.artifacts import available_here, pack
from hetero.runtime.metrics import RunMetrics, make_exporter
from hetero.runtime.online import OnlineReplanner
from hetero.runtime.replan import Replan, StagedPlan, call_replan, log_switch
from hetero.runtime.stage import StageSpec, check_stages, producers
from hetero.runtime.worker import DeviceWorker, Packet, caller_packet

log = logging.getLogger("hetero.runtime")

CROSS_NODE_INFLIGHT = 2


class RayExecutor:
    def __init__(
        self,
        stages: Sequence[StageSpec],
        needed_outputs: Sequence[str],
        *,
        cluster: ClusterSpec | None = None,
        plan: Plan | None = None,
        replan: Replan | None = None,
        timeout_s: float = 60.0,
        restart_timeout_s: float = 30.0,
        start_timeout_s: float = 120.0,
        retries: int = 1,
        max_restarts: int = 2,
        max_inflight: int = 4,
        ship_artifacts: str = "auto",
        node_map: Mapping[str, str] | None = None,
        registry: BackendRegistry | None = None,
        name: str = "hetero",
        export_metrics: bool = True,
        online: OnlineReplanner | None = None,
    ) -> None:
        """Start the workers (waits at most `start_timeout_s` for them to load) and compile
        the graph. Every later wait is bounded: a request by `timeout_s`, a recovery by
        `restart_timeout_s`.

        ship_artifacts: "auto" sends artifact bytes through the object store to workers on
        other machines (a different node address) and lets local ones read the cache
        directory; "always" / "never" force either way. registry: the backend registry the
        stages were compiled with (each worker gets a copy; default: the built-ins and entry
        points). online: re-plans when measured times leave the plan's predictions behind.
        """
        import ray  # optional (hetero[ray]): loaded on first use

        if not ray.is_initialized():
            raise ConfigError(
                "Ray is not running in this process: call ray.init(address=...) first, "
                "or run the plan in-process with hetero.runtime.LocalExecutor"
            )
        if replan is not None and cluster is None:
            raise ConfigError("a replan hook needs the cluster (pass cluster=ClusterSpec)")
        if ship_artifacts not in ("auto", "always", "never"):
            raise ConfigError(f"ship_artifacts={ship_artifacts!r}; use auto, always or never")
        self.needed_outputs = tuple(needed_outputs)
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.restart_timeout_s = restart_timeout_s
        self.start_timeout_s = start_timeout_s
        self.retries = retries
        self.max_restarts = max_restarts
        self.max_inflight = max(1, max_inflight)
        self.ship_artifacts = ship_artifacts
        self.node_map = dict(node_map or {})
        self.registry = registry if registry is not None else default_registry()
        self.name = name
        self.replan_hook = replan
        self.online = online
        self.served = 0  # requests answered, all deployments
        self.metrics: RunMetrics | None = None
        self._exporter = make_exporter(name) if export_metrics else None
        self._lock = threading.RLock()
        self._pipe: dag.CompiledPipeline | None = None
        self._workers: dict[str, Any] = {}
        self._nodes: dict[str, str] = {}  # device name -> Ray node id
        self._hosts: dict[str, str] = {}  # ClusterSpec host -> Ray node id
        self._blobs: dict[str, Any] = {}  # artifact key -> ObjectRef of its packed bytes
        self._closed = False
        self.worker_info: dict[str, dict[str, Any]] = {}  # device -> its worker's ready()
        self.history: list[StagedPlan] = []  # earlier deployments, oldest first
        self._deploy(StagedPlan(tuple(stages), plan))

    # ---- public ----------------------------------------------------------------------------
    @property
    def stages(self) -> tuple[StageSpec, ...]:
        return self.deployment.stages

    @property
    def placement(self) -> dict[str, str]:
        """device name -> Ray node id its worker was placed on."""
        return dict(self._nodes)

    @property
    def transports(self) -> dict[int, str]:
        """stage index -> how its packet leaves it: "nccl" (GPU to GPU) or "shm" (Ray's
        default channel); empty while no graph is compiled."""
        pipe = self._pipe
        return dict(pipe.transports) if pipe is not None else {}

    @property
    def workers(self) -> dict[str, Any]:
        """device name -> actor handle (for tests and tools; do not call into a live graph)."""
        return dict(self._workers)

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            self._check_open()
            self._take_online()
            attempt = 0
            while True:
                if self._pipe is None:
                    self._recover()
                try:
                    out = self._run_once(inputs)
                    self._after_requests()
                    return out
                except Exception as e:
                    cause = faults.user_error(e)
                    if cause is not None:
                        raise faults.clean(cause) from None
                    if not faults.is_fault(e):
                        raise
                    self._break(e)
                    if attempt >= self.retries:
                        raise WorkerError(
                            f"request failed after {attempt + 1} attempt(s): "
                            f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. The deployment "
                            "recovers on the next request (restarted workers, or a new plan); "
                            "raise `retries` or `timeout_s` if this repeats."
                        ) from None
                    attempt += 1

    def run_many(
        self, batch: Sequence[Mapping[str, torch.Tensor]]
    ) -> list[dict[str, torch.Tensor]]:
        """Microbatches pipelined through the stages: up to `max_inflight` in the graph at
        once. After a fault the unfinished ones are run again one by one (with retries)."""
        with self._lock:
            self._check_open()
            self._take_online()
            if self._pipe is None:
                self._recover()
            results: list[dict[str, torch.Tensor] | None] = [None] * len(batch)
            inflight: deque[tuple[int, Any, float]] = deque()
            failure: BaseException | None = None
            try:
                for i, x in enumerate(batch):
                    if len(inflight) >= self._pipe.max_inflight:
                        self._finish(inflight.popleft(), results)
                    inflight.append((i, self._pipe.execute(caller_packet(x)), time.perf_counter()))
                while inflight:
                    self._finish(inflight.popleft(), results)
            except Exception as e:
                failure = e
            if failure is not None:
                cause = faults.user_error(failure)
                for item in inflight:  # drain: the graph stays usable after a stage error
                    with contextlib.suppress(Exception):
                        self._finish(item, results)
                if cause is not None:
                    raise faults.clean(cause) from None
                if not faults.is_fault(failure):
                    raise failure
                self._break(failure)
                for i, x in enumerate(batch):
                    if results[i] is None:
                        results[i] = self.run(x)
            self._after_requests()
            return [r for r in results if r is not None]

    def measured_ms(self) -> dict[int, float]:
        return self.metrics.measured_ms()

    def recompile(self) -> None:
        """Tear the compiled graph down and compile it again over the same actors."""
        with self._lock:
            self._check_open()
            self._teardown_pipe()
            self._pipe = self._compile(self.deployment.stages)

    def shutdown(self) -> None:
        """Tear down the compiled graph and kill the workers. Safe to call twice."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self.online is not None:
                self.online.close()
            self._teardown_pipe()
            self._kill_workers()
            self._blobs.clear()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ---- deployment ----------------------------------------------------------------------------
    def _deploy(self, deployment: StagedPlan) -> None:
        stages = deployment.stages
        made_by = producers(stages)
        user_inputs = sorted({v for s in stages for v in s.inputs if v not in made_by})
        check_stages(stages, user_inputs, self.needed_outputs)
        self.deployment = deployment
        replans = self.metrics.replans if self.metrics is not None else []
        self.metrics = RunMetrics(stages, deployment.plan, self._exporter, replans=replans)
        devices = list(dict.fromkeys(s.device for s in stages))
        nodes = placement.alive_nodes()
        by_id = {n.node_id: n for n in nodes}
        host_node = placement.map_hosts(devices, nodes, self.node_map)
        self._hosts = dict(host_node)
        here = by_id.get(nodes[0].node_id) if nodes else None
        self._workers, self._nodes = {}, {}
        for d in devices:
            node = by_id[host_node[d.host]]
            mine = [s for s in stages if s.device.name == d.name]
            blobs = self._blobs_for(mine, node, here)
            opts = placement.actor_options(d, node, max_restarts=self.max_restarts)
            actor = _actor_class().options(**opts)
            self._workers[d.name] = actor.remote(d, mine, blobs, self.registry)
            self._nodes[d.name] = node.node_id
        ready, lost = faults.wait_ready(self._workers, self.start_timeout_s)
        if lost:
            self._kill_workers()
            raise WorkerError(
                "device workers did not start: "
                + "; ".join(f"{d}: {why}" for d, why in lost.items())
                + ". Check the node has the device's resources (ray status) and that the "
                "artifacts are readable there (or pass ship_artifacts='always')."
            )
        self.worker_info = ready
        for d, info in ready.items():
            log.info("worker for %s ready on node %s (pid %s)", d, info["node_id"][:8], info["pid"])
        self._pipe = self._compile(stages)

    def _blobs_for(
        self, stages: Sequence[StageSpec], node: placement.RayNode, here: placement.RayNode | None
    ) -> dict[str, Any] | None:
        import ray  # optional (hetero[ray]): loaded on first use

        ship = self.ship_artifacts == "always" or (
            self.ship_artifacts == "auto" and here is not None and node.address != here.address
        )
        if not ship:
            return None
        out = {}
        for s in stages:
            if not available_here(s.artifact):
                raise ConfigError(
                    f"artifact {s.artifact.key} of {s.name} is not at {s.artifact.path} on the "
                    "driver, so it cannot be shipped; compile the plan again"
                )
            if s.artifact.key not in self._blobs:
                self._blobs[s.artifact.key] = ray.put(pack(s.artifact))
            out[s.artifact.key] = self._blobs[s.artifact.key]
        # Refs nested in an argument stay refs (the worker fetches them); the executor
        # holds them, so a restarted worker can fetch them again.
        return out

    def _compile(self, stages: Sequence[StageSpec]) -> dag.CompiledPipeline:
        return dag.build(
            stages,
            self._workers,
            self.needed_outputs,
            max_inflight=self.inflight,
            submit_timeout_s=self.timeout_s,
        )

    @property
    def inflight(self) -> int:
        """Requests the graph holds at once. Ray 2.60's cross-node channels hang with more
        than two executions in flight (same-node ones do not), so cross-node graphs get 2."""
        here = placement.alive_nodes()[0].node_id
        if any(n != here for n in self._nodes.values()):
            return min(self.max_inflight, CROSS_NODE_INFLIGHT)
        return self.max_inflight

    # ---- requests ----------------------------------------------------------------------------
    def _run_once(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        assert self._pipe is not None
        ref = self._pipe.execute(caller_packet(inputs))
        return self._collect(inputs, self._get(ref), t0)

    def _finish(self, item: tuple[int, Any, float], results: list) -> None:
        i, ref, t0 = item
        results[i] = self._collect({}, self._get(ref), t0)

    def _get(self, ref: Any) -> list[Packet]:
        import ray  # optional (hetero[ray]): loaded on first use

        out = ray.get(ref, timeout=self.timeout_s)
        return list(out) if isinstance(out, list | tuple) else [out]

    def _collect(
        self, inputs: Mapping[str, torch.Tensor], packets: list[Packet], t0: float
    ) -> dict[str, torch.Tensor]:
        values: dict[str, Any] = dict(inputs)
        records = {}
        for p in packets:
            values.update(p.values)
            records.update(p.records)
        for rec in records.values():
            self.metrics.record(rec)
        self.metrics.record_request((time.perf_counter() - t0) * 1e3)
        self.served += 1
        missing = [n for n in self.needed_outputs if n not in values]
        if missing:
            raise WorkerError(f"the deployment did not return {missing}")
        return {n: values[n] for n in self.needed_outputs}

    # ---- online re-planning ----------------------------------------------------------------------
    def _after_requests(self) -> None:
        if self.online is not None:
            self.online.after_request(self.deployment, self.metrics, self.served)

    def _take_online(self) -> None:
        """Switch to what the online re-planner hands over, between requests (the lock is
        held: requests wait for the new workers, none is lost). The running deployment keeps
        serving when the new one does not start."""
        offer = self.online.take(self.served) if self.online is not None else None
        if offer is None:
            return
        after, event = offer
        before = self.deployment
        same = [(s.index, s.device.name, s.artifact.key) for s in after.stages] == [
            (s.index, s.device.name, s.artifact.key) for s in before.stages
        ]
        if same:  # new predictions for the same stages: no new workers, keep the runs
            self.deployment = after
            self.metrics.stages, self.metrics.plan = after.stages, after.plan
        else:
            try:
                self._switch({}, before, after, why="measured times left the predictions behind")
            except Exception as e:
                log.warning("could not switch to the re-planned deployment (%s); keeping it", e)
                event = dataclasses.replace(event, outcome=f"failed: {type(e).__name__}: {e}"[:300])
                self._kill_workers()
                self._deploy(before)
        self.metrics.record_replan(event)

    def _switch(
        self, lost: dict[str, str], before: StagedPlan, after: StagedPlan, why: str = ""
    ) -> None:
        log_switch(lost, before, after, why=why)
        self._teardown_pipe()
        self._kill_workers()
        self.history.append(before)
        self._deploy(after)

    # ---- faults --------------------------------------------------------------------------------
    def _break(self, e: BaseException) -> None:
        log.warning(
            "compiled graph of %s broke (%s: %s); tearing it down",
            self.name,
            type(e).__name__,
            str(e).splitlines()[0][:200] if str(e) else "",
        )
        self._teardown_pipe()

    def _teardown_pipe(self) -> None:
        pipe, self._pipe = self._pipe, None
        if pipe is not None:
            faults.bounded(pipe.graph.teardown, self.restart_timeout_s, "compiled graph teardown")

    def _recover(self) -> None:
        """Wait for the workers (restarted by Ray); re-plan around those that stay gone."""
        dead_nodes = self._dead_nodes()
        # Workers on a node that left cannot come back: do not wait for them.
        alive = {d: w for d, w in self._workers.items() if self._nodes[d] not in dead_nodes}
        ready, lost = faults.wait_ready(alive, self.restart_timeout_s)
        for dev, node in self._nodes.items():
            if node in dead_nodes:
                lost[dev] = f"its node {node[:8]} left the cluster"
        if not lost:
            self.worker_info = ready
            self._pipe = self._compile(self.deployment.stages)
            return
        if self.cluster is None or self.replan_hook is None:
            raise WorkerError(
                "device workers did not come back: "
                + "; ".join(f"{d}: {why}" for d, why in lost.items())
                + ". Restart the node, or give the executor a `replan` hook to move their "
                "partitions to the devices that remain."
            )
        remaining = self.cluster.without(
            d.name
            for d in self.cluster.devices
            if d.name in lost or self._hosts.get(d.host) in dead_nodes
        )
        before = self.deployment
        after = call_replan(self.replan_hook, remaining)
        self.cluster = remaining
        self._switch(lost, before, after)

    def _dead_nodes(self) -> set[str]:
        alive = {n.node_id for n in placement.alive_nodes()}
        return {n for n in self._nodes.values() if n not in alive}

    def _kill_workers(self) -> None:
        import ray  # optional (hetero[ray]): loaded on first use

        for w in self._workers.values():
            with contextlib.suppress(Exception):  # already dead is fine
                ray.kill(w, no_restart=True)
        self._workers = {}

    def _check_open(self) -> None:
        if self._closed:
            raise WorkerError(f"executor {self.name!r} was shut down; compile the model again")


def _actor_class() -> Any:
    import ray  # optional (hetero[ray]): loaded on first use

    return ray.remote(DeviceWorker)
