"""A small client for hetero.v1 on the gRPC endpoint (tests, the README); any Open Inference
Protocol client (tritonclient, the KServe client) speaks to the same server."""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from hetero.interfaces import hetero_pb2 as pb
from hetero.interfaces import hetero_pb2_grpc as pb_grpc
from hetero.interfaces.serving.tensors import from_proto, to_proto


class InferenceClient:
    """`InferenceClient("127.0.0.1:50051").infer({"idx": x})` -> {"output": tensor}."""

    def __init__(self, target: str, max_message_bytes: int = 4 * 2**20) -> None:
        self.target = target
        self.channel = grpc.insecure_channel(
            target,
            options=[
                ("grpc.max_receive_message_length", max_message_bytes),
                ("grpc.max_send_message_length", max_message_bytes),
            ],
        )
        self.stub = pb_grpc.InferenceStub(self.channel)
        self.health_stub = health_pb2_grpc.HealthStub(self.channel)
        self._input_names: list[str] | None = None

    def infer(
        self, inputs: Mapping[str, torch.Tensor], timeout: float | None = None, request_id: str = ""
    ) -> dict[str, torch.Tensor]:
        request = pb.InferRequest(
            inputs=[to_proto(n, t) for n, t in inputs.items()], request_id=request_id
        )
        response = self.stub.Infer(request, timeout=timeout)
        return {t.name: from_proto(t) for t in response.outputs}

    def __call__(self, *tensors: torch.Tensor, timeout: float | None = None) -> Any:
        """Positional call like the model's: inputs in ModelInfo's order; one output or a tuple."""
        if self._input_names is None:
            self._input_names = [i.name for i in self.model_info().inputs]
        out = list(self.infer(dict(zip(self._input_names, tensors, strict=True)), timeout).values())
        return out[0] if len(out) == 1 else tuple(out)

    def generate(
        self,
        input_ids: Any,
        max_new_tokens: int = 0,
        *,
        timeout: float | None = None,
        eos_token_id: int | Sequence[int] = (),
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int | None = None,
        request_id: str = "",
    ) -> Iterator[list[int]]:
        """Token ids as they come (one per sequence of the batch), from hetero.v1 Generate.
        `input_ids`: the prompt, [batch, length] or one prompt's ids; max_new_tokens 0: the
        server's default. Raises grpc.RpcError (INVALID_ARGUMENT, DEADLINE_EXCEEDED, ...)."""
        ids = torch.as_tensor(input_ids)
        if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
            raise TypeError(
                f"input_ids must be integer token ids; got {ids.dtype}. What to do: pass the "
                "tokenizer's ids (an int64 tensor or a list of ints)"
            )
        ids = ids.reshape(-1).tolist()
        eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        request = pb.GenerateRequest(
            input_ids=ids,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            temperature=temperature,
            top_k=top_k,
            seed=seed,
            request_id=request_id,
        )
        for answer in self.stub.Generate(request, timeout=timeout):
            yield list(answer.token_ids)

    def model_info(self, timeout: float | None = 10.0) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), timeout=timeout)

    def health(self, service: str = "", timeout: float | None = 5.0) -> str:
        """SERVING, NOT_SERVING, SERVICE_UNKNOWN or UNKNOWN."""
        r = self.health_stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_serving(self, timeout: float = 60.0, service: str = "") -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if self.health(service, timeout=2.0) == "SERVING":
                    return True
            except grpc.RpcError:
                pass
            time.sleep(0.1)
        return False

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
