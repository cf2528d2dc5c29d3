"""The serving endpoints: hetero.v1 and the Open Inference Protocol (KServe v2) over gRPC,
the OIP's HTTP/REST twin with Prometheus /metrics, plus grpc.health.v1 and reflection.

The server wraps a *servable* (see `servable.Servable`): anything with input/output
metas, `run_flat`, `ready` and `info`, so tests drive it with a fake and `hetero deploy`
with a compiled model, a compiled LM (serving/generation.py) or a Ray actor.
"""

from hetero.interfaces.serving.client import InferenceClient
from hetero.interfaces.serving.generation import LMServable
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
    "LMServable",
    "LoadingServable",
    "ModelServable",
    "Servable",
    "ServerOptions",
]
