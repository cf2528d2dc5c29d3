"""The server: one admission core behind every protocol it speaks.

Protocols: hetero.v1 (Infer, ModelInfo, Generate) and the Open Inference Protocol (KServe
v2: health, metadata, ModelInfer) on the gRPC port, with grpc.health.v1 and gRPC
reflection; the Open Inference Protocol's HTTP/REST twin and Prometheus `/metrics` on the
HTTP port (serving/http.py). Each front door decodes its wire format and hands the core
named tensors; the core answers with an `Outcome` that the door encodes.

Admission is explicit: at most `queue_limit` requests are admitted at once (running or
waiting for a model worker, streams included until their last token); the next gets
RESOURCE_EXHAUSTED at once instead of piling up. Every admitted call carries a deadline
(the client's, else the configured default); work whose deadline passed while it waited
is skipped, not run, and a stream whose deadline passes stops generating.

Health: NOT_SERVING until the servable is ready (every partition answers), back to
NOT_SERVING whenever it stops being ready (a fault, a reload), and NOT_SERVING from the
first moment of a graceful shutdown, before in-flight requests drain. A servable that is
recovering (a worker restarting, a re-plan around a lost device) still takes requests:
they wait for the recovery within their deadline instead of failing, while health tells
load balancers to send new traffic elsewhere. The OIP's ServerReady/ModelReady and
/v2/health/ready say the same.

Every request is validated before it is admitted (interfaces/validation.py: names,
dtypes, shapes, dim ranges, index bounds, bool bytes, NaN/Inf unless allowed; a
generator's own prompt checks). Requests are parsed here, not by grpcio, so bytes that
are no protobuf get INVALID_ARGUMENT.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import grpc
import torch
from google.protobuf import descriptor_pool
from grpc_health.v1 import health, health_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2

from hetero.errors import ConfigError, HeteroError, InvalidInput, Unavailable
from hetero.interfaces import grpc_predict_v2_pb2, hetero_pb2
from hetero.interfaces.serving import hetero_v1, oip_grpc
from hetero.interfaces.serving.http import HttpFront
from hetero.interfaces.serving.metrics import ServerMetrics
from hetero.interfaces.serving.outcome import Code, GenerationSettings, Outcome
from hetero.interfaces.serving.servable import servable_contract
from hetero.interfaces.serving.streams import TokenStream
from hetero.interfaces.validation import Contract

SERVICE_NAME = hetero_v1.SERVICE_NAME
_SERVING = health_pb2.HealthCheckResponse.SERVING
_NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING

# What decodes a request: given the contract, the named tensors (or InvalidInput).
Decoder = Callable[[Contract], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class ServerOptions:
    host: str = "127.0.0.1"  # loopback unless told otherwise; both ports bind here
    port: int = 0  # gRPC; 0 picks a free port; HeteroServer.port says which
    http_port: int | None = None  # the OIP's REST twin and /metrics; None: no HTTP
    max_message_bytes: int = 4 * 2**20  # both directions, both protocols
    queue_limit: int = 64  # requests admitted at once
    deadline: float = 30.0  # seconds, when the client sets none
    workers: int = 1  # model calls run at the same time
    grace: float = 10.0  # seconds in-flight calls get on shutdown
    health_poll: float = 0.5  # seconds between readiness checks of the servable
    allow_nonfinite: bool = False  # let NaN/±Inf through in floating inputs
    max_new_tokens: int = 32  # a generation request that asks for no number gets this many

    @classmethod
    def from_config(
        cls,
        serving: Any,
        host: str | None = None,
        port: int | None = None,
        http_port: int | None = None,
        max_new_tokens: int | None = None,
    ):
        """From a DeployConfig's `serving:` section; --host/--port/--http-port override it."""
        return cls(
            host=host or serving.host,
            port=serving.port if port is None else port,
            http_port=getattr(serving, "http_port", None) if http_port is None else http_port,
            max_message_bytes=serving.max_message_bytes,
            queue_limit=serving.queue_limit,
            deadline=serving.deadline,
            workers=serving.workers,
            grace=serving.grace,
            allow_nonfinite=getattr(serving, "allow_nonfinite", False),
            max_new_tokens=max_new_tokens or cls.max_new_tokens,
        )


class _Expired(Exception):
    pass


def reflection_pool() -> Any:
    """One descriptor pool holding every service this server speaks, for gRPC reflection
    (the OIP's messages live in a pool of their own: tools/gen_proto.sh says why)."""
    pool = descriptor_pool.DescriptorPool()
    for module in (hetero_pb2, grpc_predict_v2_pb2, health_pb2, reflection_pb2):
        pool.AddSerializedFile(module.DESCRIPTOR.serialized_pb)
    return pool


class HeteroServer:
    """Serve `servable`. `start()` binds (gRPC, and HTTP when asked) and returns the gRPC
    port; `shutdown()` drains."""

    def __init__(self, servable: Any, options: ServerOptions | None = None) -> None:
        self.servable = servable
        self.options = options or ServerOptions()
        o = self.options
        self._pool = ThreadPoolExecutor(max_workers=o.workers, thread_name_prefix="hetero-model")
        self._admitted = 0  # calls holding a place in the queue (running or waiting)
        self._entered = 0  # calls past the shutdown check and not yet answered
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self._stopped = threading.Event()
        self._serving = False
        self.started = time.time()
        self.stats = {
            "served": 0,
            "rejected": 0,
            "invalid": 0,
            "expired": 0,
            "failed": 0,
            "unavailable": 0,
            "cancelled": 0,  # streams whose client went away
        }
        self.metrics = ServerMetrics(self)
        self._health = health.HealthServicer()
        for service in ("", SERVICE_NAME, oip_grpc.SERVICE_NAME):
            self._health.set(service, _NOT_SERVING)
        msg_options = [
            ("grpc.max_receive_message_length", o.max_message_bytes),
            ("grpc.max_send_message_length", o.max_message_bytes),
            ("grpc.so_reuseport", 0),  # a second server must not share a port silently
        ]
        # Threads for every admitted call plus health, metadata and rejected calls.
        self._rpc_pool = ThreadPoolExecutor(
            max_workers=o.queue_limit + 8, thread_name_prefix="hetero-rpc"
        )
        self._server = grpc.server(self._rpc_pool, options=msg_options)
        self._server.add_generic_rpc_handlers(
            (
                *hetero_v1.handlers(self),
                oip_grpc.handler(self),
                hetero_v1.health_handler(self._health),
            )
        )
        reflection.enable_server_reflection(
            (SERVICE_NAME, oip_grpc.SERVICE_NAME, "grpc.health.v1.Health", reflection.SERVICE_NAME),
            self._server,
            pool=reflection_pool(),
        )
        self.http = HttpFront(self) if o.http_port is not None else None
        self._contract: tuple[Any, Contract] | None = None  # (its source, the contract)
        self.port = 0
        self._monitor = threading.Thread(target=self._watch, name="hetero-health", daemon=True)

    # ---- lifecycle ---------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"{_bracket(self.options.host)}:{self.port}"

    @property
    def http_address(self) -> str | None:
        """host:port of the HTTP endpoint, once started (None without one)."""
        if self.http is None or not self.http.port:
            return None
        return f"{_bracket(self.options.host)}:{self.http.port}"

    def start(self) -> int:
        o = self.options
        host = _bracket(o.host)
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
        if self.http is not None:
            self.http.start(o.host, o.http_port or 0)  # raises HeteroError naming the port
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
                for service in ("", SERVICE_NAME, oip_grpc.SERVICE_NAME):
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

    @property
    def live(self) -> bool:
        return not self._closing.is_set()

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
        # Drain the calls counted in (and work they left running); then stop with a short
        # grace for calls that reached gRPC but no handler yet (they are refused with
        # UNAVAILABLE, not cut off), so an open health Watch stream (which never ends by
        # itself) does not hold the shutdown for the whole grace.
        end = time.monotonic() + grace
        while (self._entered > 0 or self._admitted > 0) and time.monotonic() < end:
            time.sleep(0.02)
        if self.http is not None:
            self.http.stop()
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

    # ---- what is served ----------------------------------------------------------------------
    @property
    def model_name(self) -> str:
        name = getattr(self.servable, "name", "")
        return str(name or self._info().get("model") or "model")

    @property
    def generative(self) -> bool:
        """The servable generates tokens (a `task: generate` deployment)."""
        return bool(getattr(self.servable, "generative", False))

    def knows_model(self, name: str) -> bool:
        """Whether a request naming `name` means this server's model (empty: the only one)."""
        return name in ("", self.model_name)

    def unknown_model(self, name: str) -> Outcome:
        return Outcome(
            Code.NOT_FOUND, f"no model named {name!r} here; this server serves {self.model_name!r}"
        )

    # ---- the calls ---------------------------------------------------------------------------
    def _enter(self) -> bool:
        """Count a call in, unless shutting down (then the caller refuses it): the drain
        waits for every call counted in, so none is cut off half-way."""
        with self._lock:
            if self._closing.is_set():
                return False
            self._entered += 1
            return True

    def _leave(self) -> None:
        with self._lock:
            self._entered -= 1

    def budget(self, remaining: float | None) -> float:
        """Seconds a call may take: the client's remaining deadline, else the default."""
        # gRPC reports a call without a deadline as None or as a practically infinite time.
        return self.options.deadline if remaining is None or remaining > 1e8 else remaining

    def infer(
        self,
        decode: Decoder,
        remaining: float | None,
        protocol: str,
        parameters: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """Run one request to its end. `remaining`: the client's deadline in seconds (None:
        none given). A generator's request generates every token and answers them at once
        (`token_ids` [batch, new tokens]); `parameters` are its generation settings."""
        t0 = time.perf_counter()
        if not self._enter():
            return Outcome(Code.UNAVAILABLE, "the server is shutting down")
        try:
            if self.generative:
                outcome = self._collect(decode, remaining, parameters or {})
            else:
                outcome = self._infer(decode, self.budget(remaining))
        finally:
            self._leave()
        self.metrics.request(protocol, outcome.code, time.perf_counter() - t0)
        return outcome

    def _refuse(self, budget: float) -> Outcome | None:
        """Why a call cannot start now (its deadline passed, the model is not ready), or None."""
        if budget <= 0:
            self._count("expired")
            return Outcome(Code.DEADLINE_EXCEEDED, "the deadline passed before the call began")
        if not self._serving and not self._accepts():
            info = self._info()
            why = info.get("error") or f"state {info.get('state', 'not-ready')}"
            return Outcome(
                Code.UNAVAILABLE,
                f"{info.get('model', 'the model')} is not ready ({why}); watch grpc.health.v1 "
                f"(or the OIP's ServerReady, /v2/health/ready) for SERVING",
            )
        return None

    def _admit(self) -> Outcome | None:
        with self._lock:
            if self._admitted >= self.options.queue_limit:
                self.stats["rejected"] += 1
                return Outcome(
                    Code.RESOURCE_EXHAUSTED,
                    f"{self._admitted} requests are already admitted (serving.queue_limit="
                    f"{self.options.queue_limit}); retry with backoff",
                )
            self._admitted += 1
        return None

    def _infer(self, decode: Decoder, budget: float) -> Outcome:
        refused = self._refuse(budget)
        if refused is not None:
            return refused
        try:
            inputs = decode(self.contract())
        except InvalidInput as e:
            self._count("invalid")
            return Outcome(Code.INVALID_ARGUMENT, str(e))
        full = self._admit()
        if full is not None:
            return full
        expires = time.monotonic() + budget
        try:
            future = self._pool.submit(self._run, inputs, expires)
        except RuntimeError:  # the pool closed between the check above and here
            self._release(None)
            return Outcome(Code.UNAVAILABLE, "the server is shutting down")
        future.add_done_callback(self._release)
        try:
            outputs, ms = future.result(timeout=budget)
        except (FutureTimeout, _Expired):
            future.cancel()
            self._count("expired")
            return Outcome(
                Code.DEADLINE_EXCEEDED,
                f"no answer within the deadline ({budget * 1e3:.0f} ms); the model or its queue "
                "is slower than that",
            )
        except Unavailable as e:
            self._count("unavailable")
            return Outcome(Code.UNAVAILABLE, str(e))
        except InvalidInput as e:
            self._count("invalid")
            return Outcome(Code.INVALID_ARGUMENT, str(e))
        except Exception as e:  # a worker fault: say what failed, keep serving others
            self._count("failed")
            return Outcome(Code.INTERNAL, f"{type(e).__name__}: {e}")
        self._count("served")
        return Outcome(Code.OK, outputs=outputs, ms=ms)

    def answer_too_big(self, size: int) -> Outcome | None:
        """RESOURCE_EXHAUSTED naming the setting when an encoded answer is over the limit."""
        if size <= self.options.max_message_bytes:
            return None
        with self._lock:  # counted as failed, not served
            self.stats["served"] -= 1
            self.stats["failed"] += 1
        return Outcome(
            Code.RESOURCE_EXHAUSTED,
            f"the answer is {size} bytes, over serving.max_message_bytes="
            f"{self.options.max_message_bytes}; raise it in the config",
        )

    def failed_to_encode(self, message: str) -> Outcome:
        with self._lock:
            self.stats["served"] -= 1
            self.stats["failed"] += 1
        return Outcome(Code.INTERNAL, message)

    def _run(self, inputs: dict, expires: float):
        if time.monotonic() > expires:
            raise _Expired()  # waited out its deadline in the queue: do not spend the work
        start = time.perf_counter()
        out = self.servable.run_flat(inputs)
        return out, (time.perf_counter() - start) * 1e3

    # ---- generation --------------------------------------------------------------------------
    def generate(
        self,
        decode: Decoder,
        remaining: float | None,
        protocol: str,
        parameters: Mapping[str, Any],
    ) -> Outcome | TokenStream:
        """Start a generation: a TokenStream to iterate (tokens as they come; its `outcome`
        says how it ended), or the Outcome that refused it (not a generator, invalid,
        not ready, queue full). The stream holds its admission until its last token."""
        t0 = time.perf_counter()
        if not self._enter():
            return Outcome(Code.UNAVAILABLE, "the server is shutting down")

        def ended(stream: TokenStream) -> None:
            self._stream_ended(stream)
            self.metrics.request(protocol, stream.outcome.code, stream.seconds)
            self._leave()

        try:
            started = self._start_stream(decode, self.budget(remaining), parameters, ended)
        except BaseException:
            self._leave()
            raise
        if isinstance(started, Outcome):
            self._leave()
            self.metrics.request(protocol, started.code, time.perf_counter() - t0)
        return started

    def _start_stream(
        self,
        decode: Decoder,
        budget: float,
        parameters: Mapping[str, Any],
        on_end: Callable[[TokenStream], None],
    ) -> Outcome | TokenStream:
        if not self.generative:
            self._count("invalid")
            return Outcome(
                Code.INVALID_ARGUMENT,
                f"{self.model_name} does not generate (its deploy config has no `task: "
                "generate`); call Infer / ModelInfer",
            )
        refused = self._refuse(budget)
        if refused is not None:
            return refused
        try:
            inputs = decode(self.contract())
            settings = GenerationSettings.parse(parameters, self.options.max_new_tokens)
            ids = self.servable.check(inputs, settings)
        except (InvalidInput, ConfigError) as e:
            self._count("invalid")
            return Outcome(Code.INVALID_ARGUMENT, str(e))
        full = self._admit()
        if full is not None:
            return full
        stream = TokenStream(
            self.servable,
            ids,
            settings,
            expires=time.monotonic() + budget,
            on_end=on_end,
        )
        try:
            future = self._pool.submit(stream.produce)
        except RuntimeError:  # the pool closed between the check above and here
            self._release(None)
            return Outcome(Code.UNAVAILABLE, "the server is shutting down")
        future.add_done_callback(self._release)
        return stream

    def _stream_ended(self, stream: TokenStream) -> None:
        """Count a finished stream (once, whoever saw its end first)."""
        outcome = stream.outcome
        key = {
            Code.OK: "served",
            Code.DEADLINE_EXCEEDED: "expired",
            Code.INVALID_ARGUMENT: "invalid",
            Code.UNAVAILABLE: "unavailable",
            Code.CANCELLED: "cancelled",
        }.get(outcome.code, "failed")
        self._count(key)
        self.metrics.generation(stream)

    def _collect(self, decode: Decoder, remaining: float | None, parameters: Mapping) -> Outcome:
        """A whole generation as one answer (ModelInfer / Infer on a generator)."""
        started = self._start_stream(decode, self.budget(remaining), parameters, self._stream_ended)
        if isinstance(started, Outcome):
            return started
        tokens = [t.token_ids for t in started]
        outcome = started.outcome
        if not outcome.ok:
            return outcome
        return Outcome(Code.OK, outputs={"token_ids": torch.stack(tokens, dim=1)}, ms=started.ms)

    # ---- helpers -----------------------------------------------------------------------------
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

    @property
    def admitted(self) -> int:
        return self._admitted

    def _info(self) -> dict[str, Any]:
        try:
            return dict(getattr(self.servable, "info", dict)())
        except Exception as e:  # info is best effort; say why it is missing
            return {"state": "unknown", "error": f"info failed: {e}"}

    def info(self) -> dict[str, Any]:
        """The servable's info with the state health tells (ready only while SERVING)."""
        info = self._info()
        if info.get("state", "ready") == "ready" and not self._serving:
            info["state"] = "not-ready"
        return info


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host
