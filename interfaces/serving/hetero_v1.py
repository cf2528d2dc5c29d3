"""hetero.v1.Inference on the gRPC port: Infer and ModelInfo over named tensors, Generate
streaming tokens; and grpc.health.v1, both parsing their own requests."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health_pb2

from hetero.errors import InvalidInput
from hetero.interfaces import hetero_pb2 as pb
from hetero.interfaces.serving.generation import prompt_inputs
from hetero.interfaces.serving.outcome import Outcome
from hetero.interfaces.serving.tensors import decode_inputs, meta_info, to_proto

if TYPE_CHECKING:  # the server imports this module
    from hetero.interfaces.serving.server import HeteroServer

SERVICE_NAME = "hetero.v1.Inference"
PROTOCOL = "hetero.v1"


def parsed(message_type: Any, handler: Any) -> Any:
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


def abort(context: grpc.ServicerContext, outcome: Outcome) -> None:
    context.abort(outcome.code.grpc, outcome.message)


def remaining(context: grpc.ServicerContext) -> float | None:
    return context.time_remaining()


def handlers(server: HeteroServer) -> tuple[Any, ...]:
    def infer(request: pb.InferRequest, context: grpc.ServicerContext) -> pb.InferResponse:
        outcome = server.infer(
            lambda contract: decode_inputs(request.inputs, contract),
            remaining(context),
            PROTOCOL,
        )
        if not outcome.ok:
            abort(context, outcome)
        try:
            tensors = [to_proto(name, t) for name, t in outcome.outputs.items()]
        except InvalidInput as e:
            abort(context, server.failed_to_encode(str(e)))
        response = pb.InferResponse(
            outputs=tensors, request_id=request.request_id, server_ms=outcome.ms
        )
        too_big = server.answer_too_big(response.ByteSize())
        if too_big is not None:
            abort(context, too_big)
        return response

    def model_info(request: pb.ModelInfoRequest, context: grpc.ServicerContext):
        return _model_info(server)

    def generate(request: pb.GenerateRequest, context: grpc.ServicerContext):
        params: dict[str, Any] = {
            "max_new_tokens": request.max_new_tokens,
            "eos_token_id": list(request.eos_token_id),
            "temperature": request.temperature,
            "top_k": request.top_k,
        }
        if request.HasField("seed"):
            params["seed"] = request.seed
        started = server.generate(
            lambda contract: prompt_inputs(list(request.input_ids), contract),
            remaining(context),
            PROTOCOL,
            params,
        )
        if isinstance(started, Outcome):
            abort(context, started)
        # A client that cancels or whose deadline passes ends the call: stop generating.
        context.add_callback(started.cancel)
        for token in started:
            yield pb.GenerateResponse(
                token_ids=token.token_ids.tolist(),
                index=token.index,
                ms=token.ms,
                request_id=request.request_id,
            )
        if not started.outcome.ok:
            abort(context, started.outcome)

    unary = grpc.unary_unary_rpc_method_handler
    inference = grpc.method_handlers_generic_handler(
        SERVICE_NAME,
        {
            "Infer": unary(
                parsed(pb.InferRequest, infer),
                response_serializer=pb.InferResponse.SerializeToString,
            ),
            "ModelInfo": unary(
                parsed(pb.ModelInfoRequest, model_info),
                response_serializer=pb.ModelInfoResponse.SerializeToString,
            ),
            "Generate": grpc.unary_stream_rpc_method_handler(
                parsed(pb.GenerateRequest, generate),
                response_serializer=pb.GenerateResponse.SerializeToString,
            ),
        },
    )
    return (inference,)


def health_handler(health_servicer: Any) -> Any:
    unary = grpc.unary_unary_rpc_method_handler
    check = health_pb2.HealthCheckRequest
    respond = health_pb2.HealthCheckResponse.SerializeToString
    return grpc.method_handlers_generic_handler(
        "grpc.health.v1.Health",
        {
            "Check": unary(parsed(check, health_servicer.Check), response_serializer=respond),
            "Watch": grpc.unary_stream_rpc_method_handler(
                parsed(check, health_servicer.Watch), response_serializer=respond
            ),
        },
    )


def _model_info(server: HeteroServer) -> pb.ModelInfoResponse:
    info = server.info()
    servable = server.servable
    return pb.ModelInfoResponse(
        model=str(info.get("model", "")),
        inputs=[meta_info(n, m) for n, m in servable.input_metas.items()],
        outputs=[meta_info(n, m) for n, m in getattr(servable, "output_metas", {}).items()],
        plan_summary=str(info.get("plan_summary", "")),
        partitions=[pb.PartitionInfo(**row) for row in info.get("partitions", [])],
        state=str(info.get("state", "ready")),
        error=str(info.get("error", "")),
        max_message_bytes=server.options.max_message_bytes,
    )
