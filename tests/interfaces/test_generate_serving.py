"""Generation served: a real server with the tiny LLaMA of configs/deploy/cpu-2core-generate.yaml
on cpu-2core, on 127.0.0.1. hetero.v1 Generate streams transformers' greedy tokens; bad
prompts get INVALID_ARGUMENT naming the problem; a deadline mid-stream stops generating
and the next request is served; the queue limit holds for streams; the Open Inference
Protocol's ModelInfer (tritonclient) and the HTTP generate extension give the same tokens."""

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
from tritonclient.utils import InferenceServerException

from hetero.errors import ConfigError
from hetero.interfaces import hetero_pb2 as pb
from hetero.interfaces.commands.bench_generate import bench_generation, percentiles
from hetero.interfaces.config import config_from_dict, load_config
from hetero.interfaces.deploy import build_compiled
from hetero.interfaces.serving import LMServable

CONFIG = "configs/deploy/cpu-2core-generate.yaml"
NEW = 24


class SlowLM(LMServable):
    """The same LM, `delay` seconds after each token: a generation that outlasts a deadline.
    `made` counts the tokens the model produced, so a test sees where generation stopped."""

    def __init__(self, lm, name: str, delay: float = 0.0) -> None:
        super().__init__(lm, name)
        self.delay = delay
        self.made = 0
        self.gate: threading.Event | None = None

    def stream(self, ids, settings):
        for token in super().stream(ids, settings):
            self.made += 1
            yield token
            if self.gate is not None:
                self.gate.wait(30)
            time.sleep(self.delay)


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """(CompiledLM, the transformers model, prompt [1, 11], its greedy NEW tokens)."""
    cfg = load_config(CONFIG)
    cfg = cfg.model_copy(update={"cache_dir": str(tmp_path_factory.mktemp("gen-cache"))})
    loaded = cfg.load_model()
    model, prompt = loaded.module, loaded.example_inputs[0]
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)
    lm = build_compiled(cfg, loaded=loaded)
    yield lm, model, prompt, ref[0, prompt.shape[1] :].tolist()
    lm.shutdown()


@pytest.fixture
def lm_server(serve, compiled):
    """serve the compiled LM (SlowLM, no delay unless a test sets one) on both ports."""
    lm = compiled[0]

    def start(**options):
        servable = SlowLM(lm, "tiny-llama")
        servable.shutdown = lambda: None  # the module's LM outlives each server
        server, client = serve(servable, http_port=0, **options)
        return server, client, servable

    return start


def _code(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


def test_streamed_tokens_are_transformers_greedy_tokens_as_they_come(lm_server, compiled):
    _, _, prompt, expected = compiled
    server, client, slow = lm_server()
    tokens = [t[0] for t in client.generate(prompt, NEW)]
    assert tokens == expected
    # as they come: with 50 ms between tokens, the first arrives long before the last
    slow.delay = 0.05
    arrivals, t0 = [], time.perf_counter()
    for _ in client.generate(prompt, 6, timeout=30):
        arrivals.append(time.perf_counter() - t0)
    assert len(arrivals) == 6 and arrivals[-1] - arrivals[0] > 0.2
    assert client.model_info().inputs[0].name == "input_ids"
    assert server.stats["served"] == 2


def test_bad_prompts_get_invalid_argument_naming_the_problem(lm_server, compiled):
    _, _, prompt, expected = compiled
    _, client, slow = lm_server()
    cases = {
        "vocab": (torch.tensor([[1, 2, 512]]), 4, ["input_ids[0, 2] = 512", "0 <= id < 512"]),
        "negative": (torch.tensor([[5, -1]]), 4, ["input_ids[0, 1] = -1"]),
        "too long": (torch.zeros(1, 60, dtype=torch.long), 8, ["68 cache positions", "max_length=64"]),
        "empty": (torch.zeros(1, 0, dtype=torch.long), 4, ["empty"]),
    }  # fmt: skip
    for name, (ids, new, words) in cases.items():
        code, details = _code(lambda ids=ids, new=new: list(client.generate(ids, new, timeout=10)))
        assert code == grpc.StatusCode.INVALID_ARGUMENT, (name, details)
        for w in words:
            assert w in details, (name, details)
    code, details = _code(lambda: list(client.generate(prompt, 4, temperature=-1.0, timeout=10)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "'temperature'" in details
    # float ids never leave the client: protobuf would only say a float is not an integer
    with pytest.raises(TypeError, match="integer token ids"):
        list(client.generate(torch.randn(1, 5), 4, timeout=10))
    assert slow.made == 0  # nothing invalid reached the model
    assert [t[0] for t in client.generate(prompt, 4)] == expected[:4]


def test_a_deadline_mid_stream_stops_generating_and_the_next_request_is_served(lm_server, compiled):
    _, _, prompt, expected = compiled
    server, client, slow = lm_server()
    slow.delay = 0.1  # 40 tokens would take 4 s
    got: list[list[int]] = []
    with pytest.raises(grpc.RpcError) as info:
        for t in client.generate(prompt, 40, timeout=0.5):
            got.append(t)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert 1 <= len(got) < 40 and [t[0] for t in got] == expected[: len(got)]
    time.sleep(0.5)
    made = slow.made
    assert made <= len(got) + 2  # the server stopped after the step in flight
    time.sleep(0.5)
    assert slow.made == made  # ... and makes no more
    slow.delay = 0.0
    assert [t[0] for t in client.generate(prompt, NEW, timeout=30)] == expected
    assert server.stats["expired"] == 1 and server.admitted == 0


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"max_new_tokens": 0}, "'max_new_tokens': 0 is below 1"),  # was the default, silently
        ({"max_new_tokens": float("inf")}, "'max_new_tokens': inf is not an integer"),
        ({"top_k": float("nan")}, "'top_k': nan is not an integer"),
        ({"eos_token_id": [float("inf")]}, "'eos_token_id': inf is not an integer"),
        ({"seed": 2**64 - 1}, "'seed': 18446744073709551615 is above"),
    ],
)
def test_request_parameters_torch_cannot_take_are_invalid_not_internal(params, words):
    """JSON carries inf and NaN and any integer: each an InvalidInput naming the parameter,
    where int() raised OverflowError or ValueError (an INTERNAL answer) or a seed beyond
    torch.Generator's range failed inside the step."""
    from hetero.errors import InvalidInput
    from hetero.interfaces.serving.outcome import GenerationSettings

    with pytest.raises(InvalidInput, match=words.replace("(", "\\(")):
        GenerationSettings.parse(params, 8)
    assert GenerationSettings.parse({"seed": 2**63 - 1}, 8).seed == 2**63 - 1


@pytest.mark.parametrize(("expires_in", "code"), [(-0.001, "DEADLINE_EXCEEDED"), (60, "CANCELLED")])
def test_grpc_ending_a_call_at_its_deadline_counts_as_the_deadline(expires_in, code):
    """gRPC ends a call at its deadline through the callback a client's cancel takes: loaded
    (CI), that callback came before the stream's own clock saw the deadline, and the stream
    was counted cancelled, not expired."""
    from hetero.interfaces.serving.outcome import GenerationSettings
    from hetero.interfaces.serving.streams import TokenStream

    ended: list[TokenStream] = []
    stream = TokenStream(
        None, torch.zeros(1, 3, dtype=torch.long), GenerationSettings(max_new_tokens=4),
        expires=time.monotonic() + expires_in, on_end=ended.append,
    )  # fmt: skip
    stream.cancel()
    assert ended == [stream] and stream.outcome.code.name == code


def test_a_client_that_cancels_stops_the_generation(lm_server, compiled):
    _, _, prompt, expected = compiled
    server, client, slow = lm_server()
    slow.delay = 0.1
    request = pb.GenerateRequest(input_ids=prompt.reshape(-1).tolist(), max_new_tokens=40)
    call = client.stub.Generate(request, timeout=30)
    assert list(next(call).token_ids) == expected[:1]
    call.cancel()
    deadline = time.monotonic() + 5
    while (server.admitted or not server.stats["cancelled"]) and time.monotonic() < deadline:
        time.sleep(0.02)
    made = slow.made
    time.sleep(0.5)
    assert server.admitted == 0 and slow.made == made < 10  # stopped, not run to 40
    slow.delay = 0.0
    assert [t[0] for t in client.generate(prompt, 4, timeout=30)] == expected[:4]


def test_streams_hold_their_place_in_the_queue(lm_server, compiled):
    _, _, prompt, expected = compiled
    server, client, slow = lm_server(queue_limit=1)
    slow.gate = threading.Event()
    with ThreadPoolExecutor(1) as pool:
        held = pool.submit(lambda: [t[0] for t in client.generate(prompt, 3, timeout=30)])
        while server.admitted < 1:
            time.sleep(0.01)
        code, details = _code(lambda: list(client.generate(prompt, 3, timeout=10)))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "queue_limit=1" in details
        slow.gate.set()
        assert held.result(timeout=30) == expected[:3]


def test_oip_model_infer_and_http_generate_give_the_same_tokens(lm_server, compiled):
    _, _, prompt, expected = compiled
    server, _, _ = lm_server()
    g = tgrpc.InferenceServerClient(server.address)
    try:
        inputs = [tgrpc.InferInput("input_ids", list(prompt.shape), "INT64")]
        inputs[0].set_data_from_numpy(prompt.numpy())
        out = g.infer("tiny-llama", inputs, parameters={"max_new_tokens": NEW})
        assert out.as_numpy("token_ids").tolist() == [expected]
        inputs = [tgrpc.InferInput("input_ids", [1, 3], "INT64")]
        inputs[0].set_data_from_numpy(np.array([[1, 2, 900]], dtype=np.int64))
        with pytest.raises(InferenceServerException) as info:
            g.infer("tiny-llama", inputs)
        assert "INVALID_ARGUMENT" in info.value.status() and "900" in info.value.message()
    finally:
        g.close()
    base = f"http://{server.http_address}/v2/models/tiny-llama"
    body = {"input_ids": prompt.tolist(), "parameters": {"max_new_tokens": 8}}
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/generate", json.dumps(body).encode()), timeout=30
    ) as r:
        assert json.loads(r.read())["token_ids"] == [expected[:8]]
    with urllib.request.urlopen(
        urllib.request.Request(f"{base}/generate_stream", json.dumps(body).encode()), timeout=30
    ) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in r.read().decode().splitlines() if line]
    assert [e["token_ids"][0] for e in events] == expected[:8]
    assert [e["index"] for e in events] == list(range(8))
    bad = {"input_ids": [[1, 2, 512]], "parameters": {"max_new_tokens": 2}}
    with pytest.raises(urllib.error.HTTPError) as http_error:
        urllib.request.urlopen(
            urllib.request.Request(f"{base}/generate_stream", json.dumps(bad).encode()), timeout=30
        )
    assert http_error.value.code == 400 and b"512" in http_error.value.read()
    with urllib.request.urlopen(f"http://{server.http_address}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert "hetero_time_to_first_token_seconds_count 3.0" in text
    assert "hetero_generated_tokens_total 40.0" in text  # 24 + 8 + 8


def test_generate_configs_say_what_is_wrong():
    base = {"model": "hetero.interfaces.models:tiny_llama", "task": "generate"}
    cfg = config_from_dict(base)
    assert cfg.generation.max_length == 256 and cfg.compile_kwargs()["task"] == "generate"
    assert config_from_dict({**base, "feedback": True}).compile_kwargs()["feedback"] is True
    with pytest.raises(ConfigError, match="dynamic"):
        config_from_dict({**base, "dynamic": {"input_ids": {1: "seq"}}})
    with pytest.raises(ConfigError, match="task: generate"):
        config_from_dict({"model": base["model"], "generation": {"max_length": 64}})
    with pytest.raises(ConfigError, match="max_length"):
        config_from_dict({**base, "generation": {"max_length": 1}})


def test_bench_reports_time_to_first_token_and_ms_per_token(tmp_path):
    cfg = load_config(CONFIG).model_copy(update={"cache_dir": str(tmp_path)})
    result = bench_generation(cfg, runs=2, warmup=0, new_tokens=4)
    assert result["tokens_match"] and result["new_tokens"] == 4 and result["prompt_tokens"] == 11
    for way in ("hetero", "transformers_eager"):
        ttft, per_token = result[way]["ttft_ms"], result[way]["ms_per_token"]
        assert 0 < ttft["p10"] <= ttft["p50"] <= ttft["p90"]
        assert 0 < per_token["p10"] <= per_token["p50"] <= per_token["p90"]
    assert percentiles([1.0, 2.0, 3.0])["p50"] == 2.0 and percentiles([])["p50"] is None
