"""Run a server in the foreground until SIGINT/SIGTERM, then drain and exit (hetero serve/deploy)."""

from __future__ import annotations

import signal
import threading
from typing import Any

from rich.console import Console

from hetero.interfaces.serving.oip_grpc import SERVICE_NAME as OIP_SERVICE
from hetero.interfaces.serving.server import SERVICE_NAME, HeteroServer, ServerOptions


def serve_foreground(
    servable: Any,
    options: ServerOptions,
    console: Console | None = None,
    stop: threading.Event | None = None,
    on_start: Any = None,
) -> HeteroServer:
    """Serve until a signal (or `stop` is set); health turns NOT_SERVING, in-flight calls finish."""
    console = console or Console(stderr=True)
    stop = stop or threading.Event()
    server = HeteroServer(servable, options)
    server.start()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda signum, _frame: stop.set())
    http = server.http_address
    console.print(
        f"[bold]serving[/] on {server.address} (gRPC: {SERVICE_NAME}, the Open Inference "
        f"Protocol's {OIP_SERVICE}, grpc.health.v1, reflection)"
        + (f"; HTTP on {http} (/v2/..., /metrics)" if http else "")
        + f"; max message {options.max_message_bytes} bytes. Ctrl-C drains and exits.",
        highlight=False,
    )
    if options.host not in ("127.0.0.1", "localhost", "::1"):
        console.print(
            f"[yellow]note:[/] listening on {options.host}: the endpoint has no authentication; "
            "keep it on a trusted network",
            highlight=False,
        )
    if on_start is not None:
        on_start(server)
    try:
        while not stop.wait(0.5):
            pass
        console.print("draining in-flight requests (health says NOT_SERVING) ...", highlight=False)
        server.shutdown()
        console.print(f"stopped; served {server.stats['served']} requests", highlight=False)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return server
