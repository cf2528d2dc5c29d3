"""The gRPC endpoint: Infer and ModelInfo over named tensors, plus grpc.health.v1.

The server wraps a *servable* (see `servable.Servable`): anything with input/output
metas, `run_flat`, `ready` and `info`, so tests drive it with a fake and `hetero deploy`
with a compiled model or a Ray actor.
"""

from hetero.interfaces.serving.client import InferenceClient
from hetero.interfaces.serving.servable import (
    ActorServable,
    LoadingServable,
    ModelServable,
    Servable,
)
from hetero.interfaces.serving.server import SERVICE_NAME, HeteroServer, ServerOptions

__all__ = [
    "SERVICE_NAME",
    "ActorServable",
    "HeteroServer",
    "InferenceClient",
    "LoadingServable",
    "ModelServable",
    "Servable",
    "ServerOptions",
]
