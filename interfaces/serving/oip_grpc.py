"""The Open Inference Protocol over gRPC (service inference.GRPCInferenceService), on the
same port as hetero.v1: health, metadata and ModelInfer through the server's one admission
core. On a generator (`task: generate`) ModelInfer answers the whole generation at once
(`token_ids` [batch, new tokens]; parameters max_new_tokens, temperature, top_k, seed,
eos_token_id); hetero.v1's Generate streams the same tokens as they come."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc

from hetero.errors import InvalidInput
from hetero.interfaces import grpc_predict_v2_pb2 as oip
from hetero.interfaces.serving import oip as wire
from hetero.interfaces.serving.hetero_v1 import abort, parsed

if TYPE_CHECKING:  # the server imports this module
    from hetero.interfaces.serving.server import HeteroServer

SERVICE_NAME = "inference.GRPCInferenceService"
PROTOCOL = "oip-grpc"


def deadline(server: HeteroServer, context: grpc.ServicerContext, params: dict) -> float | None:
    """The client's deadline, tightened by Triton's `timeout` parameter (microseconds)."""
    remaining = context.time_remaining()
    timeout = params.get("timeout")
    if isinstance(timeout, int) and not isinstance(timeout, bool) and timeout > 0:
        return min(server.budget(remaining), timeout / 1e6)
    return remaining


def handler(server: HeteroServer) -> Any:
    def check_model(name: str, version: str, context: grpc.ServicerContext) -> None:
        if not server.knows_model(name) or version not in ("", wire.VERSION):
            what = name if not version else f"{name} version {version}"
            abort(context, server.unknown_model(what))

    def server_live(request: oip.ServerLiveRequest, context: grpc.ServicerContext):
        return oip.ServerLiveResponse(live=server.live)

    def server_ready(request: oip.ServerReadyRequest, context: grpc.ServicerContext):
        return oip.ServerReadyResponse(ready=server.serving)

    def model_ready(request: oip.ModelReadyRequest, context: grpc.ServicerContext):
        check_model(request.name, request.version, context)
        return oip.ModelReadyResponse(ready=server.serving)

    def server_metadata(request: oip.ServerMetadataRequest, context: grpc.ServicerContext):
        return oip.ServerMetadataResponse(**wire.server_metadata(server.generative))

    def model_metadata(request: oip.ModelMetadataRequest, context: grpc.ServicerContext):
        check_model(request.name, request.version, context)
        meta = wire.model_metadata(server.model_name, server.servable)
        response = oip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"]
        )
        for kind in ("inputs", "outputs"):
            for t in meta[kind]:
                getattr(response, kind).add(**t)
        return response

    def model_infer(request: oip.ModelInferRequest, context: grpc.ServicerContext):
        check_model(request.model_name, request.model_version, context)
        params = wire.grpc_parameters(request.parameters)
        outcome = server.infer(
            lambda contract: wire.grpc_inputs(request, contract),
            deadline(server, context, params),
            PROTOCOL,
            params,
        )
        if not outcome.ok:
            abort(context, outcome)
        try:
            response = wire.grpc_answer(request, server.model_name, outcome.outputs)
        except InvalidInput as e:
            abort(context, server.failed_to_encode(str(e)))
        too_big = server.answer_too_big(response.ByteSize())
        if too_big is not None:
            abort(context, too_big)
        return response

    calls = {
        "ServerLive": (oip.ServerLiveRequest, oip.ServerLiveResponse, server_live),
        "ServerReady": (oip.ServerReadyRequest, oip.ServerReadyResponse, server_ready),
        "ModelReady": (oip.ModelReadyRequest, oip.ModelReadyResponse, model_ready),
        "ServerMetadata": (
            oip.ServerMetadataRequest,
            oip.ServerMetadataResponse,
            server_metadata,
        ),
        "ModelMetadata": (oip.ModelMetadataRequest, oip.ModelMetadataResponse, model_metadata),
        "ModelInfer": (oip.ModelInferRequest, oip.ModelInferResponse, model_infer),
    }
    return grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            name: grpc.unary_unary_rpc_method_handler(
                parsed(request, fn), response_serializer=response.SerializeToString
            )
            for name, (request, response, fn) in calls.items()
        },
    )
