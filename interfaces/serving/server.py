"""The gRPC server: Infer, ModelInfo and grpc.health.v1 around a servable.

Admission is explicit: at most `queue_limit` Infer calls are admitted at once (running
or waiting for a model worker); the next gets RESOURCE_EXHAUSTED at once instead of
piling up. Every admitted call carries a deadline (the client's, else the configured
default); work whose deadline passed while it waited is skipped, not run.

Health: NOT_SERVING until the servable is ready (every partition answers), back to
NOT_SERVING whenever it stops being ready (a fault, a reload), and NOT_SERVING from the
first moment of a graceful shutdown, before in-flight requests drain. A servable that is
recovering (a worker restarting, a re-plan around a lost device) still takes requests:
they wait for the recovery within their deadline instead of failing, while health tells
load balancers to send new traffic elsewhere.

Every request is validated before it is admitted (interfaces/validation.py: names,
dtypes, shapes, dim ranges, index bounds, bool bytes, NaN/Inf unless allowed). Requests
are parsed here, not by grpcio, so bytes that are no protobuf get INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2

from hetero.errors import HeteroError, InvalidInput, Unavailable
from hetero.interfaces import hetero_pb2 as pb
from hetero.interfaces.serving.servable import servable_contract
from hetero.interfaces.serving.tensors import decode_inputs, meta_info, to_proto
from hetero.interfaces.validation import Contract

SERVICE_NAME = "hetero.v1.Inference"
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # loopback unless told otherwise
    port: int = 0  # 0 picks a free port; HeteroServer.port says which
    max_message_bytes: int = 4 * 2**20  # both directions; gRPC's default receive limit
    queue_limit: int = 64  # Infer calls admitted at once
    deadline: float = 30.0  # seconds, when the client sets none
    workers: int = 1  # model calls run at the same time
    grace: float = 10.0  # seconds in-flight calls get on shutdown
    health_poll: float = 0.5  # seconds between readiness checks of the servable
    allow_nonfinite: bool = False  # let NaN/±Inf through in floating inputs

    @classmethod
    def from_config(cls, serving: Any, host: str | None = None, port: int | None = None):
        """From a DeployConfig's `serving:` section; --host/--port override it."""
        return cls(
            host=host or serving.host,
            port=serving.port if port is None else port,
            max_message_bytes=serving.max_message_bytes,
            queue_limit=serving.queue_limit,
            deadline=serving.deadline,
            workers=serving.workers,
            grace=serving.grace,
            allow_nonfinite=getattr(serving, "allow_nonfinite", False),
        )


class _Expired(Exception):
    pass


def _parsed(message_type: Any, handler: Any) -> Any:
    """`handler(request, context)` fed from raw bytes: bytes that do not parse as
    `message_type` get INVALID_ARGUMENT (grpcio's own parsing answers INTERNAL)."""

    def run(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = message_type.FromString(raw)
        except Exception as e:  # DecodeError, or a string field that is not UTF-8
            context.abort(
                grpc.StatusCode.INVALID_ARGUMENT,
                f"the request is not a valid {message_type.DESCRIPTOR.full_name}: {e}",
            )
        return handler(request, context)

    return run


def _handlers(server: HeteroServer, health_servicer: Any) -> tuple[Any, ...]:
    """hetero.v1.Inference and grpc.health.v1.Health, both parsing their own requests."""

    def infer(request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        if not server._enter():
            context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
        try:
            code, message, response = server._infer(request, context)
        finally:
            server._leave()
        if code is not None:
            context.abort(code, message)
        return response

    def model_info(request: pb.ModelInfoRequest, context: grpc.ServicerContext):
        return server._model_info()

    unary = grpc.unary_unary_rpc_method_handler
    inference = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Infer": unary(
                _parsed(pb.InferRequest, infer),
                response_serializer=pb.InferResponse.SerializeToString,
            ),
            "ModelInfo": unary(
                _parsed(pb.ModelInfoRequest, model_info),
                response_serializer=pb.ModelInfoResponse.SerializeToString,
            ),
        },
    )
    check = health_pb2.HealthCheckRequest
    respond = health_pb2.HealthCheckResponse.SerializeToString
    healthz = grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": unary(_parsed(check, health_servicer.Check), response_serializer=respond),
            "Watch": grpc.unary_stream_rpc_method_handler(
                _parsed(check, health_servicer.Watch), response_serializer=respond
            ),
        },
    )
    return inference, healthz


class HeteroServer:
    """Serve `servable` over gRPC. `start()` binds and returns the port; `shutdown()` drains."""

    def __init__(self, servable: Any, options: ServerOptions | None = None) -> None:
        self.servable = servable
        self.options = options or ServerOptions()
        o = self.options
        self._pool = ThreadPoolExecutor(max_workers=o.workers, thread_name_prefix="hetero-model")
        self._admitted = 0  # calls holding a place in the queue (running or waiting)
        self._entered = 0  # Infer calls past the shutdown check
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self.stats = {
            "served": 0,
            "rejected": 0,
            "invalid": 0,
            "expired": 0,
            "failed": 0,
            "unavailable": 0,
        }
        self._health = health.HealthServicer()
        for service in ("", SERVICE_NAME):
            self._health.set(service, _NOT_SERVING)
        msg_options = [
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server must not share a port silently
        ]
        # Threads for every admitted call plus health, ModelInfo and rejected calls.
        self._rpc_pool = ThreadPoolExecutor(
            max_workers=o.queue_limit + 8, thread_name_prefix="hetero-rpc"
        )
        self._server = grpc.server(self._rpc_pool, options=msg_options)
        self._server.add_generic_rpc_handlers(_handlers(self, self._health))
        self._contract: tuple[Any, Contract] | None = None  # (its source, the contract)
        self.port = 0
        self._monitor = threading.Thread(target=self._watch, name="hetero-health", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        host = self.options.host
        host = f"[{host}]" if ":" in host and not host.startswith("[") else host
        return f"{host}:{self.port}"

    def start(self) -> int:
        o = self.options
        host = f"[{o.host}]" if ":" in o.host and not o.host.startswith("[") else o.host
        try:
            port = self._server.add_insecure_port(f"{host}:{o.port}")
        except RuntimeError as e:
            port = 0
            reason = str(e)
        else:
            reason = "the port is in use or the host is not an address of this machine"
        if port == 0:
            raise HeteroError(
                f"cannot listen on {host}:{o.port} ({reason}); pick another --port "
                "(0 picks a free one) or --host"
            )
        self.port = port
        self._server.start()
        self._monitor.start()
        return port

    def _watch(self) -> None:
        while not self._closing.is_set():
            try:
                ready = bool(self.servable.ready())
            except Exception:  # a readiness probe that fails means not ready
                ready = False
            if ready != self._serving and not self._closing.is_set():
                self._serving = ready
                for service in ("", SERVICE_NAME):
                    self._health.set(service, _SERVING if ready else _NOT_SERVING)
            self._closing.wait(self.options.health_poll)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until health says SERVING (True) or `timeout` passes (False)."""
        end = None if timeout is None else time.monotonic() + timeout
        while not self._serving:
            if self._closing.is_set() or (end is not None and time.monotonic() > end):
                return False
            time.sleep(0.05)
        return True

    @property
    def serving(self) -> bool:
        return self._serving and not self._closing.is_set()

    def shutdown(self, grace: float | None = None) -> None:
        """NOT_SERVING at once, refuse new calls, let in-flight ones finish, then stop."""
        if self._closing.is_set():
            self._stopped.wait()
            return
        with self._lock:
            self._closing.set()
        self._serving = False
        self._health.enter_graceful_shutdown()
        grace = self.options.grace if grace is None else grace
        # Drain the Infer calls counted in (and work they left running); then stop with a
        # short grace for calls that reached gRPC but no handler yet (they are refused with
        # UNAVAILABLE, not cut off), so an open health Watch stream (which never ends by
        # itself) does not hold the shutdown for the whole grace.
        end = time.monotonic() + grace
        while (self._entered > 0 or self._admitted > 0) and time.monotonic() < end:
            time.sleep(0.02)
        self._server.stop(min(1.0, grace)).wait()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._rpc_pool.shutdown(wait=False)
        try:
            if hasattr(self.servable, "shutdown"):
                self.servable.shutdown()
        finally:
            self._stopped.set()

    def wait_for_termination(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> HeteroServer:
        if not self.port:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---- the calls ---------------------------------------------------------------------------
    def _enter(self) -> bool:
        """Count an Infer call in, unless shutting down (then the caller refuses it): the
        drain waits for every call counted in, so none is cut off half-way."""
        with self._lock:
            if self._closing.is_set():
                return False
            self._entered += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._entered -= 1

    def _infer(self, request: pb.InferRequest, context: grpc.ServicerContext):
        """(status code, message, response): code None means success."""
        remaining = context.time_remaining()
        # gRPC reports a call without a deadline as None or as a practically infinite time.
        no_deadline = remaining is None or remaining > 1e8
        budget = self.options.deadline if no_deadline else remaining
        if budget <= 0:
            self._count("expired")
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                "the deadline passed before the call began",
                None,
            )
        if not self._serving and not self._accepts():
            info = self._info()
            why = info.get("error") or f"state {info.get('state', 'not-ready')}"
            return (
                grpc.StatusCode.UNAVAILABLE,
                f"{info.get('model', 'the model')} is not ready ({why}); watch grpc.health.v1 "
                f"for SERVING",
                None,
            )
        try:
            inputs = decode_inputs(request.inputs, self.contract())
        except InvalidInput as e:
            self._count("invalid")
            return grpc.StatusCode.INVALID_ARGUMENT, str(e), None
        with self._lock:
            if self._admitted >= self.options.queue_limit:
                self.stats["rejected"] += 1
                return (
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"{self._admitted} requests are already admitted (serving.queue_limit="
                    f"{self.options.queue_limit}); retry with backoff",
                    None,
                )
            self._admitted += 1
        expires = time.monotonic() + budget
        try:
            future = self._pool.submit(self._run, inputs, expires)
        except RuntimeError:  # the pool closed between the check above and here
            self._release(None)
            return grpc.StatusCode.UNAVAILABLE, "the server is shutting down", None
        future.add_done_callback(self._release)
        try:
            outputs, ms = future.result(timeout=budget)
        except (FutureTimeout, _Expired):
            future.cancel()
            self._count("expired")
            return (
                grpc.StatusCode.DEADLINE_EXCEEDED,
                f"no answer within the deadline ({budget * 1e3:.0f} ms); the model or its queue "
                "is slower than that",
                None,
            )
        except Unavailable as e:
            self._count("unavailable")
            return grpc.StatusCode.UNAVAILABLE, str(e), None
        except InvalidInput as e:
            self._count("invalid")
            return grpc.StatusCode.INVALID_ARGUMENT, str(e), None
        except Exception as e:  # a worker fault: say what failed, keep serving others
            self._count("failed")
            return grpc.StatusCode.INTERNAL, f"{type(e).__name__}: {e}", None
        try:
            tensors = [to_proto(name, t) for name, t in outputs.items()]
        except InvalidInput as e:
            self._count("failed")
            return grpc.StatusCode.INTERNAL, str(e), None
        response = pb.InferResponse(outputs=tensors, request_id=request.request_id, server_ms=ms)
        size = response.ByteSize()
        if size > self.options.max_message_bytes:
            self._count("failed")
            return (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the answer is {size} bytes, over serving.max_message_bytes="
                f"{self.options.max_message_bytes}; raise it in the config",
                None,
            )
        self._count("served")
        return None, "", response

    def _run(self, inputs: dict, expires: float):
        if time.monotonic() > expires:
            raise _Expired()  # waited out its deadline in the queue: do not spend the work
        start = time.perf_counter()
        out = self.servable.run_flat(inputs)
        return out, (time.perf_counter() - start) * 1e3

    def contract(self) -> Contract:
        """What a request must hold: the servable's contract, NaN/Inf refused unless allowed."""
        source = servable_contract(self.servable)
        cached = self._contract
        if cached is None or cached[0] is not source:
            contract = source.with_finite(not self.options.allow_nonfinite)
            self._contract = cached = (source, contract)
        return cached[1]

    def _accepts(self) -> bool:
        """Whether a request may wait for the servable (it is recovering, not loading)."""
        probe = getattr(self.servable, "accepts", None)
        try:
            return bool(probe()) if callable(probe) else False
        except Exception:  # a probe that fails means no
            return False

    def _count(self, key: str) -> None:
        with self._lock:
            self.stats[key] += 1

    def _release(self, _future: Future | None) -> None:
        with self._lock:
            self._admitted -= 1

    def _info(self) -> dict[str, Any]:
        try:
            return dict(getattr(self.servable, "info", dict)())
        except Exception as e:  # info is best effort; say why it is missing
            return {"state": "unknown", "error": f"info failed: {e}"}

    def _model_info(self) -> pb.ModelInfoResponse:
        info = self._info()
        state = info.get("state", "ready")
        if state == "ready" and not self._serving:
            state = "not-ready"
        return pb.ModelInfoResponse(
            model=str(info.get("model", "")),
            inputs=[meta_info(n, m) for n, m in self.servable.input_metas.items()],
            outputs=[
                meta_info(n, m) for n, m in getattr(self.servable, "output_metas", {}).items()
            ],
            plan_summary=str(info.get("plan_summary", "")),
            partitions=[pb.PartitionInfo(**row) for row in info.get("partitions", [])],
            state=state,
            error=str(info.get("error", "")),
            max_message_bytes=self.options.max_message_bytes,
        )
