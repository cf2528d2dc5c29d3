"""The Open Inference Protocol's HTTP/REST twin, its generate extension and Prometheus
`/metrics`, on their own port (serving.http_port), through the server's admission core.

    GET  /v2/health/live                   200 while the server runs
    GET  /v2/health/ready                  200 while every partition answers, else 400
    GET  /v2                               server metadata
    GET  /v2/models/{name}[/versions/1]    model metadata (-1 where a dim varies)
    GET  /v2/models/{name}[/versions/1]/ready
    POST /v2/models/{name}[/versions/1]/infer       JSON `data`, or the binary tensor data
                                                    extension (Inference-Header-Content-Length)
    POST /v2/models/{name}/generate         a generator's whole answer: {"token_ids": [[...]]}
    POST /v2/models/{name}/generate_stream  server-sent events, one per token as it comes
    GET  /metrics                          Prometheus text format

Errors are `{"error": message}` with the status of their code (interfaces/serving/outcome.py:
400 invalid, 404 unknown model, 413 body over serving.max_message_bytes, 429 queue full,
503 not ready, 504 deadline). A request's deadline is the config's `serving.deadline`,
or Triton's `parameters.timeout` (microseconds) when smaller.

aiohttp serves it (an asyncio loop in one thread): it is already here as Ray's dependency,
streams server-sent events, and bounds request bodies itself. Handlers hand the blocking
work (decoding, validation, the model) to a thread pool, so the loop only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from hetero.errors import HeteroError, InvalidInput
from hetero.interfaces.serving import oip as wire
from hetero.interfaces.serving.generation import INPUT, prompt_inputs
from hetero.interfaces.serving.outcome import Code, Outcome
from hetero.interfaces.serving.streams import TokenStream

if TYPE_CHECKING:  # the server imports this module
    from hetero.interfaces.serving.server import HeteroServer

PROTOCOL = "oip-http"
_NOT_READY = 400  # the spec: "a 4xx status code indicates false"


class HttpFront:
    """An aiohttp application on its own event loop thread; `start` binds, `stop` closes."""

    def __init__(self, server: HeteroServer) -> None:
        self.server = server
        self.port = 0
        o = server.options
        self._pool = ThreadPoolExecutor(
            max_workers=o.queue_limit + 8, thread_name_prefix="hetero-http"
        )
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self, host: str, port: int) -> int:
        started = threading.Event()
        failure: list[BaseException] = []
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self._bind(host, port))
            except BaseException as e:  # reported to start()'s caller below
                failure.append(e)
                started.set()
                loop.close()
                return
            started.set()
            loop.run_forever()
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name="hetero-http", daemon=True)
        self._thread.start()
        started.wait()
        if failure:
            raise HeteroError(
                f"cannot listen on {host}:{port} for HTTP ({failure[0]}); pick another "
                "--http-port (0 picks a free one) or --host"
            )
        return self.port

    async def _bind(self, host: str, port: int) -> None:
        app = web.Application(client_max_size=self.server.options.max_message_bytes)
        base = "/v2/models/{name}"
        versioned = base + "/versions/{version}"
        app.router.add_get("/v2/health/live", self._live)
        app.router.add_get("/v2/health/ready", self._ready)
        app.router.add_get("/v2", self._server_metadata)
        app.router.add_get("/metrics", self._metrics)
        for prefix in (base, versioned):
            app.router.add_get(prefix, self._model_metadata)
            app.router.add_get(prefix + "/ready", self._model_ready)
            app.router.add_post(prefix + "/infer", self._infer)
            app.router.add_post(prefix + "/generate", self._generate)
            app.router.add_post(prefix + "/generate_stream", self._generate_stream)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, reuse_port=False)
        try:
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])

    def stop(self) -> None:
        loop, runner = self._loop, self._runner
        if loop is None or runner is None or not loop.is_running():
            return
        with contextlib.suppress(Exception):  # closing is best effort; the thread is a daemon
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- helpers -----------------------------------------------------------------------------
    async def _blocking(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _model(self, request: web.Request) -> Outcome | None:
        """NOT_FOUND unless the path names this server's model (and version 1, if any)."""
        name = request.match_info["name"]
        version = request.match_info.get("version", "")
        if self.server.knows_model(name) and version in ("", wire.VERSION):
            return None
        return self.server.unknown_model(name if not version else f"{name} version {version}")

    async def _body(self, request: web.Request) -> bytes | web.Response:
        try:
            return await request.read()
        except web.HTTPRequestEntityTooLarge:
            limit = self.server.options.max_message_bytes
            return _error(
                Outcome(Code.RESOURCE_EXHAUSTED, ""),
                f"the request body is over serving.max_message_bytes={limit}; raise it in the "
                "config for big tensors",
                status=413,
            )

    # ---- health and metadata -----------------------------------------------------------------
    async def _live(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.server.live else _NOT_READY)

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200 if self.server.serving else _NOT_READY)

    async def _server_metadata(self, request: web.Request) -> web.Response:
        return web.json_response(wire.server_metadata(self.server.generative))

    async def _model_metadata(self, request: web.Request) -> web.Response:
        unknown = self._model(request)
        if unknown is not None:
            return _error(unknown)
        server = self.server
        return web.json_response(wire.model_metadata(server.model_name, server.servable))

    async def _model_ready(self, request: web.Request) -> web.Response:
        unknown = self._model(request)
        if unknown is not None:
            return _error(unknown)
        return web.Response(status=200 if self.server.serving else _NOT_READY)

    async def _metrics(self, request: web.Request) -> web.Response:
        text = await self._blocking(generate_latest, self.server.metrics.registry)
        return web.Response(body=text, headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ---- inference ---------------------------------------------------------------------------
    async def _infer(self, request: web.Request) -> web.Response:
        unknown = self._model(request)
        if unknown is not None:
            return _error(unknown)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        header = request.headers.get(wire.HEADER_LENGTH)
        status, payload, headers = await self._blocking(self._infer_sync, body, header)
        return web.Response(status=status, body=payload, headers=headers)

    def _infer_sync(self, body: bytes, header: str | None) -> tuple[int, bytes, dict[str, str]]:
        server = self.server
        try:
            parsed, binary = wire.split_body(body, header)
            params = _parameters(parsed)
        except InvalidInput as e:
            return _error_parts(Outcome(Code.INVALID_ARGUMENT, str(e)))
        outcome = server.infer(
            lambda contract: wire.json_inputs(parsed, binary, contract),
            _timeout(params),
            PROTOCOL,
            params,
        )
        if not outcome.ok:
            return _error_parts(outcome)
        try:
            payload, headers = wire.json_answer(parsed, server.model_name, outcome.outputs)
        except InvalidInput as e:
            return _error_parts(server.failed_to_encode(str(e)))
        too_big = server.answer_too_big(len(payload))
        if too_big is not None:
            return _error_parts(too_big)
        return 200, payload, headers

    # ---- generation (the generate extension) -------------------------------------------------
    def _start(self, body: bytes) -> Outcome | TokenStream:
        try:
            parsed, _ = wire.split_body(body, None)
            params = _parameters(parsed)
            unknown = sorted(set(parsed) - {INPUT, "parameters", "id"})
            if unknown:
                raise InvalidInput(
                    f"unknown field {', '.join(map(repr, unknown))}; a generate request has "
                    f"{INPUT!r} and `parameters` ({', '.join(_GENERATION_KEYS)}, timeout)"
                )
            if INPUT not in parsed:
                raise InvalidInput(f"missing {INPUT!r}: the prompt's token ids")
        except InvalidInput as e:
            return Outcome(Code.INVALID_ARGUMENT, str(e))
        return self.server.generate(
            lambda contract: prompt_inputs(parsed[INPUT], contract),
            _timeout(params),
            PROTOCOL,
            params,
        )

    async def _generate(self, request: web.Request) -> web.Response:
        unknown = self._model(request)
        if unknown is not None:
            return _error(unknown)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        started = await self._blocking(self._start, body)
        if isinstance(started, Outcome):
            return _error(started)
        try:
            tokens = await self._blocking(lambda: [t.token_ids.tolist() for t in started])
        finally:
            if started.outcome is None:
                started.cancel()
        if not started.outcome.ok:
            return _error(started.outcome)
        rows = [list(seq) for seq in zip(*tokens, strict=True)] if tokens else []
        return web.json_response(
            {
                "model_name": self.server.model_name,
                "model_version": wire.VERSION,
                "token_ids": rows,
                "ms": started.ms,
            }
        )

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        unknown = self._model(request)
        if unknown is not None:
            return _error(unknown)
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        started = await self._blocking(self._start, body)
        if isinstance(started, Outcome):
            return _error(started)
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        tokens = iter(started)
        try:
            await response.prepare(request)
            model = self.server.model_name
            while True:
                token = await self._blocking(next, tokens, None)
                if token is None:
                    break
                event = {
                    "model_name": model,
                    "model_version": wire.VERSION,
                    "token_ids": token.token_ids.tolist(),
                    "index": token.index,
                    "ms": token.ms,
                }
                await response.write(_event(event))
            if not started.outcome.ok:
                # The status line is sent already: the error travels as the last event.
                code, message = started.outcome.code, started.outcome.message
                await response.write(_event({"error": message, "code": code.name}))
            await response.write_eof()
        finally:
            if started.outcome is None:  # the client went away mid-stream
                started.cancel()
        return response


_GENERATION_KEYS = ("max_new_tokens", "eos_token_id", "temperature", "top_k", "seed")


def _event(data: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


def _parameters(request: dict[str, Any]) -> dict[str, Any]:
    params = request.get("parameters") or {}
    if not isinstance(params, dict):
        raise InvalidInput("`parameters` must be a JSON object")
    return params


def _timeout(params: dict[str, Any]) -> float | None:
    """Triton's `timeout` parameter (microseconds) as seconds; None when absent."""
    t = params.get("timeout")
    if isinstance(t, int) and not isinstance(t, bool) and t > 0:
        return t / 1e6
    return None


def _error_parts(outcome: Outcome) -> tuple[int, bytes, dict[str, str]]:
    body = json.dumps({"error": outcome.message}).encode()
    return outcome.code.http, body, {"Content-Type": "application/json"}


def _error(outcome: Outcome, message: str | None = None, status: int | None = None):
    return web.json_response(
        {"error": outcome.message if message is None else message},
        status=status or outcome.code.http,
    )
