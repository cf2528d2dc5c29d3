"""The Open Inference Protocol (KServe v2) with the standard client, tritonclient, over gRPC
and HTTP against real servers on 127.0.0.1: health, metadata, inference, the same
validation, deadlines and queue limit as hetero.v1, gRPC reflection and /metrics."""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
import tritonclient.grpc as tgrpc
import tritonclient.http as thttp
from cluster_fakes import FakeServable
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)
from tritonclient.utils import InferenceServerException

import hetero
from hetero.interfaces.config import ServingOptions
from hetero.interfaces.serving import LoadingServable, ModelServable, ServerOptions

X = np.arange(16, dtype=np.float32).reshape(2, 8)
IDS = np.arange(4, dtype=np.int64)
WANT = X * 2 + IDS.sum()  # FakeServable: y = 2x + sum(ids)


class Named(FakeServable):
    name = "fake"


def _grpc_inputs(x=X, ids=IDS, module=tgrpc):
    inputs = [module.InferInput("x", list(x.shape), "FP32"), module.InferInput("ids", [4], "INT64")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(ids)
    return inputs


def _post(url: str, body: dict, timeout: float = 10) -> tuple[int, dict]:
    request = urllib.request.Request(url, json.dumps(body).encode())
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def _body(x, ids=IDS, dtype="FP32"):
    x = np.asarray(x)
    return {
        "inputs": [
            {"name": "x", "shape": list(x.shape), "datatype": dtype, "data": x.tolist()},
            {"name": "ids", "shape": [4], "datatype": "INT64", "data": ids.tolist()},
        ]
    }


@pytest.fixture
def oip(serve):
    """(server, tritonclient gRPC, tritonclient HTTP, base URL) on loopback, both ports."""
    opened = []

    def start(servable, **options):
        server, _ = serve(servable, http_port=0, **options)
        g = tgrpc.InferenceServerClient(server.address)
        h = thttp.InferenceServerClient(server.http_address, network_timeout=30)
        opened.extend((g, h))
        return server, g, h, f"http://{server.http_address}"

    yield start
    for client in opened:
        client.close()


def test_tritonclient_grpc_and_http_see_health_metadata_and_answers(oip):
    server, g, h, _ = oip(Named())
    assert server.address.startswith("127.0.0.1:") and server.http_address.startswith("127.0.0.1:")
    for client in (g, h):
        assert client.is_server_live() and client.is_server_ready()
        assert client.is_model_ready("fake")
    meta = g.get_model_metadata("fake", as_json=True)
    assert meta["platform"] == "hetero" and meta["versions"] == ["1"]
    assert [(i["name"], i["datatype"], i["shape"]) for i in meta["inputs"]] == [
        ("x", "FP32", ["-1", "8"]),  # int64 shapes print as strings in protobuf's JSON
        ("ids", "INT64", ["4"]),
    ]
    assert h.get_model_metadata("fake")["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [-1, 8]}
    ]
    assert "binary_tensor_data" in h.get_server_metadata()["extensions"]
    np.testing.assert_allclose(g.infer("fake", _grpc_inputs()).as_numpy("y"), WANT)
    # HTTP: binary inputs and outputs (tritonclient's default), then JSON both ways
    np.testing.assert_allclose(h.infer("fake", _grpc_inputs(module=thttp)).as_numpy("y"), WANT)
    json_inputs = _grpc_inputs(module=thttp)
    for i in json_inputs:
        i.set_data_from_numpy(X if i.name() == "x" else IDS, binary_data=False)
    out = h.infer("fake", json_inputs, outputs=[thttp.InferRequestedOutput("y", binary_data=False)])
    np.testing.assert_allclose(out.as_numpy("y"), WANT)
    # a dynamic batch dim: any size
    x5 = np.ones((5, 8), dtype=np.float32)
    assert g.infer("fake", _grpc_inputs(x5)).as_numpy("y").shape == (5, 8)


def test_bad_requests_get_invalid_argument_naming_the_problem_on_both_protocols(oip):
    fake = Named()
    _, g, _, base = oip(fake)
    nan = X.copy()
    nan[1, 3] = np.nan
    cases = {
        "shape": (np.ones((2, 9), np.float32), ["'x'", "dim 1 is 9", "expected 8"]),
        "nan": (nan, ["'x'", "element [1, 3]", "NaN"]),
    }
    for name, (x, words) in cases.items():
        with pytest.raises(InferenceServerException) as info:
            g.infer("fake", _grpc_inputs(x))
        assert info.value.status() == "StatusCode.INVALID_ARGUMENT", name
        for w in words:
            assert w in info.value.message(), (name, info.value.message())
    for body, words in (
        (_body(np.ones((2, 9), np.float32)), ["'x'", "dim 1 is 9", "expected 8"]),
        ({"inputs": [{"name": "x", "shape": [2, 8], "datatype": "FP32", "data": [1.0]}]}, ["ids"]),
        ({**_body(X), "inputs": _body(X)["inputs"][:1]}, ["missing input 'ids'"]),
        (_body(X, dtype="FP64"), ["'x'", "dtype float64", "float32"]),
        (_body([[1.5] * 8] * 2, ids=np.array([1, 2, 3, 2**40])), []),  # int64 holds 2**40
        ({"inputs": "nope"}, ["`inputs` must be a list"]),
    ):
        status, answer = _post(f"{base}/v2/models/fake/infer", body)
        if words:
            assert status == 400 and all(w in answer["error"] for w in words), answer
        else:
            assert status == 200
    request = urllib.request.Request(f"{base}/v2/models/fake/infer", b"{not json")
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(request, timeout=10)
    assert http_error.value.code == 400 and b"not JSON" in http_error.value.read()
    # an unknown model is NOT_FOUND / 404 naming the one served
    with pytest.raises(InferenceServerException) as info:
        g.get_model_metadata("other")
    assert "StatusCode.NOT_FOUND" in info.value.status() and "'fake'" in info.value.message()
    assert _get(f"{base}/v2/models/other")[0] == 404
    # bytes that are no protobuf: INVALID_ARGUMENT, as on hetero.v1
    channel = grpc.insecure_channel(g._channel._channel.target().decode())
    call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as rpc:
        call(b"\xff\xff\xff", timeout=5)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    channel.close()
    np.testing.assert_allclose(g.infer("fake", _grpc_inputs()).as_numpy("y"), WANT)
    assert fake.calls == 2  # nothing invalid reached the model


def test_deadlines_and_the_queue_limit_hold_on_both_protocols(oip):
    gate = threading.Event()
    fake = Named(gate=gate)
    server, g, _, base = oip(fake, queue_limit=2, workers=1)
    with ThreadPoolExecutor(2) as pool:
        held = [pool.submit(g.infer, "fake", _grpc_inputs(), client_timeout=30) for _ in range(2)]
        while server.admitted < 2:
            time.sleep(0.01)
        with pytest.raises(InferenceServerException) as info:
            g.infer("fake", _grpc_inputs(), client_timeout=10)
        assert (
            "RESOURCE_EXHAUSTED" in info.value.status() and "queue_limit=2" in info.value.message()
        )
        status, body = _post(f"{base}/v2/models/fake/infer", _body(X))
        assert status == 429 and "queue_limit=2" in body["error"]
        gate.set()
        assert all(f.result(timeout=30).as_numpy("y").shape == (2, 8) for f in held)
    fake.gate, fake.delay = None, 0.5
    with pytest.raises(InferenceServerException) as info:
        g.infer("fake", _grpc_inputs(), client_timeout=0.1)
    assert "DEADLINE_EXCEEDED" in info.value.status()
    status, body = _post(
        f"{base}/v2/models/fake/infer", {**_body(X), "parameters": {"timeout": 100_000}}
    )
    assert status == 504 and "deadline" in body["error"]
    fake.delay = 0.0
    time.sleep(1.0)  # the slow calls drain
    np.testing.assert_allclose(g.infer("fake", _grpc_inputs()).as_numpy("y"), WANT)


def test_readiness_tells_the_truth_while_loading(oip):
    release = threading.Event()
    fake = Named()

    def build():
        release.wait(30)
        return fake

    _, g, h, base = oip(LoadingServable(build, name="fake"), wait=False)
    assert g.is_server_live() and h.is_server_live()  # live at once ...
    assert not g.is_server_ready() and not h.is_model_ready("fake")  # ... not ready
    assert _get(f"{base}/v2/health/ready")[0] == 400 and _get(f"{base}/v2/health/live")[0] == 200
    status, body = _post(f"{base}/v2/models/fake/infer", _body(X))
    assert status == 503 and "state loading" in body["error"]
    release.set()
    deadline = time.monotonic() + 10
    while not g.is_server_ready() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert g.is_model_ready("fake") and _get(f"{base}/v2/health/ready")[0] == 200


def test_reflection_lists_every_service_and_describes_model_infer(serve):
    _, client = serve(Named())
    db = ProtoReflectionDescriptorDatabase(client.channel)
    services = set(db.get_services())
    assert {
        "inference.GRPCInferenceService",
        "hetero.v1.Inference",
        "grpc.health.v1.Health",
    } <= services
    pool = DescriptorPool(db)
    infer = pool.FindServiceByName("inference.GRPCInferenceService").FindMethodByName("ModelInfer")
    assert infer.input_type.full_name == "inference.ModelInferRequest"
    generate = pool.FindServiceByName("hetero.v1.Inference").FindMethodByName("Generate")
    assert generate.server_streaming


def test_metrics_give_per_request_and_per_partition_figures(oip, mlp, tmp_path):
    model, example = mlp
    cm = hetero.compile(
        model, example, cluster="configs/clusters/cpu-2core.yaml", backends={"cpu": "eager"},
        cache_dir=tmp_path,
    )  # fmt: skip
    _, g, _, base = oip(ModelServable(cm, name="mlp"))
    x = example[0].numpy()
    inputs = [tgrpc.InferInput(cm.input_names[0], list(x.shape), "FP32")]
    inputs[0].set_data_from_numpy(x)
    for _ in range(3):
        out = g.infer("mlp", inputs).as_numpy(cm.output_names[0])
    torch.testing.assert_close(torch.from_numpy(out), model(*example), rtol=1e-5, atol=1e-5)
    assert _post(f"{base}/v2/models/mlp/infer", {"inputs": []})[0] == 400
    status, text = _get(f"{base}/metrics")
    text = text.decode()
    assert status == 200
    assert 'hetero_requests_total{code="OK",protocol="oip-grpc"} 3.0' in text
    assert 'hetero_requests_total{code="INVALID_ARGUMENT",protocol="oip-http"} 1.0' in text
    assert "hetero_request_duration_seconds_bucket" in text and "hetero_ready 1.0" in text
    for p in cm.plan.partitions:
        labels = f'backend="{p.backend}",device="{p.device}",partition="p{p.index}"'
        assert f"hetero_partition_runs_total{{{labels}}}" in text
        assert f"hetero_partition_predicted_ms{{{labels}}}" in text


def test_everything_binds_loopback_unless_told_otherwise():
    assert ServerOptions().host == "127.0.0.1"
    serving = ServingOptions()
    assert serving.host == "127.0.0.1" and serving.http_port == 8000 and serving.port == 50051
    options = ServerOptions.from_config(serving, port=0, http_port=0)
    assert options.host == "127.0.0.1" and options.http_port == 0
