"""Real gRPC servers for the interface tests, on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from hetero.interfaces.serving import HeteroServer, InferenceClient, ServerOptions


@pytest.fixture
def serve() -> Iterator:
    """serve(servable, **options) -> (server, client); everything is shut down afterwards."""
    started: list[tuple[HeteroServer, InferenceClient]] = []

    def start(servable, wait: bool = True, **options):
        options.setdefault("health_poll", 0.05)
        server = HeteroServer(servable, ServerOptions(port=0, **options))
        server.start()
        client = InferenceClient(
            server.address, max_message_bytes=options.get("max_message_bytes", 4 * 2**20) * 4
        )
        started.append((server, client))
        if wait:
            assert client.wait_serving(timeout=30)
        return server, client

    yield start
    for server, client in started:
        client.close()
        server.shutdown(grace=1.0)
