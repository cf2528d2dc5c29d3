"""The Ray executor: one actor per device, a compiled graph between them, faults handled.

Lifecycle: place one `DeviceWorker` actor per device on the node that holds it, wait
until each has loaded its artifacts, compile the graph. Per request: execute, wait at
most `timeout_s`. A stage's own exception reaches the caller as a WorkerError and the
graph keeps serving. A dead actor, a broken channel or a deadline tears the graph down;
the executor waits up to `restart_timeout_s` for the actors (Ray restarts them,
`max_restarts`, and they reload their artifacts), compiles a new graph and retries the
request `retries` times. Devices that do not come back (node gone, restarts spent) are
handed to the `replan` hook, and the executor switches to the stages it returns; when no
device is left, or none of those left can run the model, requests get `Unavailable`
naming the lost devices. With an `online` re-planner (runtime/online.py) it also
switches, between requests, to the plans measured stage times call for.

Health: a watcher thread pings every worker each `watch_s` seconds, so a worker that dies
while no request runs is noticed (and repaired) too. `ready()` is true only while every
worker answers and the graph is compiled; `accepts()` also while a repair runs (requests
wait for it); `status()` says which, and why.
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
from hetero.errors import ConfigError, HeteroError, Unavailable, WorkerError
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

READY, RECOVERING, FAILED, CLOSED = "ready", "recovering", "failed", "closed"


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
        watch_s: float = 1.0,
        retry_s: float = 30.0,
        online: OnlineReplanner | None = None,
        imports: Sequence[str] = (),
    ) -> None:
        """Start the workers (waits at most `start_timeout_s` for them to load) and compile
        the graph. Every later wait is bounded: a request by `timeout_s`, a recovery by
        `restart_timeout_s`.

        ship_artifacts: "auto" sends artifact bytes through the object store to workers on
        other machines (a different node address) and lets local ones read the cache
        directory; "always" / "never" force either way. registry: the backend registry the
        stages were compiled with (each worker gets a copy; default: the built-ins and entry
        points).

        watch_s: seconds between health pings of the workers (0: no watcher; faults are
        then found by the next request). retry_s: how often a deployment that could not
        be repaired (no device left) tries again. online: re-plans when measured
        times leave the plan's predictions behind.
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
        # modules each worker imports first: they register the library operators the
        # partitions call (backends/library_ops.py)
        self.imports = tuple(imports)
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
        self.watch_s = watch_s
        self.retry_s = retry_s
        self._state, self._fault = RECOVERING, "starting"
        self._next_try = 0.0  # when a deployment that could not be repaired tries again
        self._stop = threading.Event()
        self._deploy(StagedPlan(tuple(stages), plan))
        self._set(READY)
        self._watcher: threading.Thread | None = None
        if watch_s > 0:
            self._watcher = threading.Thread(
                target=self._watch, name=f"hetero-watch-{name}", daemon=True
            )
            self._watcher.start()

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

    # ---- health ------------------------------------------------------------------------------
    def ready(self) -> bool:
        """Every worker answered its last ping and the graph is compiled."""
        return self._state == READY

    def accepts(self) -> bool:
        """A request may be queued: ready, or being repaired (it waits for the repair)."""
        return self._state in (READY, RECOVERING)

    def status(self) -> tuple[str, str]:
        """(state, why): ready, recovering (what broke), failed (why it cannot serve), closed."""
        return self._state, self._fault

    def _set(self, state: str, fault: str = "") -> None:
        if state != self._state:
            log.log(
                logging.INFO if state in (READY, CLOSED) else logging.WARNING,
                "%s: %s%s",
                self.name,
                state,
                f" ({fault})" if fault else "",
            )
        self._state, self._fault = state, fault

    def run(self, inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._lock:
            self._check_open()
            self._take_online()
            attempt = 0
            while True:
                if self._pipe is None:
                    self._repair()
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
                self._repair()
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
        self._stop.set()
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._set(CLOSED)
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
        shared = placement.sharing_cores(devices, host_node)
        self._workers, self._nodes = {}, {}
        for d in devices:
            node = by_id[host_node[d.host]]
            mine = [s for s in stages if s.device.name == d.name]
            blobs = self._blobs_for(mine, node, here)
            opts = placement.actor_options(
                d, node, max_restarts=self.max_restarts, shares_cores=d.name in shared
            )
            actor = _actor_class().options(**opts)
            self._workers[d.name] = actor.remote(d, mine, blobs, self.registry, self.imports)
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
        why = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        log.warning("compiled graph of %s broke (%s); tearing it down", self.name, why)
        self._set(RECOVERING, f"the compiled graph broke ({why})")
        self._teardown_pipe()

    def _repair(self) -> None:
        """Recover (under the lock); a deployment that cannot be repaired says why, fast."""
        if self._state == FAILED and time.monotonic() < self._next_try:
            raise Unavailable(self._fault)
        if self._state != RECOVERING:
            self._set(RECOVERING, self._fault or "repairing")
        try:
            self._recover()
        except Exception as e:  # whatever stops the repair, the deployment says so
            why = str(e) if isinstance(e, HeteroError) else f"{type(e).__name__}: {e}"
            self._next_try = time.monotonic() + self.retry_s
            self._set(FAILED, why)
            raise Unavailable(why) from None
        self._set(READY)

    # ---- the watcher -----------------------------------------------------------------------------
    def _watch(self) -> None:
        silent: dict[str, int] = {}  # device -> pings in a row without an answer
        while not self._stop.wait(self.watch_s):
            try:
                if self._state == READY:
                    lost = self._probe(silent)
                    if lost:
                        self._set(RECOVERING, "; ".join(f"{d}: {w}" for d, w in lost.items()))
                        self._heal()
                elif self._state == FAILED and time.monotonic() >= self._next_try:
                    self._heal()
            except Exception as e:  # the watcher must outlive any one failure
                log.warning("health watcher of %s: %s: %s", self.name, type(e).__name__, e)

    def _probe(self, silent: dict[str, int]) -> dict[str, str]:
        """Workers that died, are restarting, or missed two pings in a row."""
        import ray  # optional (hetero[ray]): this executor runs only where Ray does
        from ray.exceptions import GetTimeoutError  # optional (hetero[ray])

        workers = dict(self._workers)
        refs = {}
        lost: dict[str, str] = {}
        for d, w in workers.items():
            try:
                refs[d] = w.ready.remote()
            except Exception as e:  # a handle whose actor is gone
                lost[d] = f"{type(e).__name__}: {e}"
        timeout = max(2.0, 2 * self.watch_s)
        for d, ref in refs.items():
            try:
                ray.get(ref, timeout=timeout)
                silent.pop(d, None)
            except GetTimeoutError:
                silent[d] = silent.get(d, 0) + 1
                if silent[d] >= 2:
                    lost[d] = f"no answer to two pings of {timeout:g} s"
            except Exception as e:  # died, or restarting
                lost[d] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        return lost

    def _heal(self) -> None:
        with self._lock:
            if self._closed or self._state == READY:
                return  # a request repaired it meanwhile
            self._teardown_pipe()
            with contextlib.suppress(Unavailable):  # reported through status()
                self._repair()

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
        gone = "; ".join(f"{d} ({why})" for d, why in lost.items())
        if not remaining.devices:
            raise Unavailable(
                f"no device is left to run the model: lost {gone}. Bring the devices back "
                "(restart the node or its workers) and redeploy."
            )
        before = self.deployment
        try:
            after = call_replan(self.replan_hook, remaining)
        except Exception as e:  # PlanInfeasible, a backend that cannot compile there, ...
            left = ", ".join(d.name for d in remaining.devices)
            raise Unavailable(
                f"lost {gone}; no plan over the devices left ({left}) can run the model: {e}"
            ) from None
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
