"""The fault suite's Ray half: a served model on the session cluster keeps every request
while a worker is killed under load, says NOT_SERVING while it repairs, and when a
worker's restarts are spent it re-plans over the devices left and says SERVING again.
Every health check answers within 1 s throughout."""

from __future__ import annotations

import threading
import time
from collections import Counter

import grpc
import pytest
import torch
from rt_helpers import CLUSTER

import hetero
from hetero.cluster.spec import ClusterSpec
from hetero.interfaces.models import mlp_block
from hetero.interfaces.serving import HeteroServer, InferenceClient, ModelServable, ServerOptions

ray = pytest.importorskip("ray")
pytestmark = [pytest.mark.ray, pytest.mark.faults, pytest.mark.timeout(300)]


class Load:
    """Clients sending good requests in a loop; every answer is checked against eager."""

    def __init__(self, client: InferenceClient, model: torch.nn.Module, threads: int = 3):
        self.client, self.model = client, model
        self.answers: list[tuple[str, bool]] = []  # (status code name, correct?)
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(threads)
        ]

    def _loop(self, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        while not self.stop.is_set():
            x = torch.randn(2, 4, 256, generator=gen)
            try:
                (y,) = self.client.infer({"x": x}, timeout=120).values()
                with torch.no_grad():
                    ok = torch.allclose(y, self.model(x), atol=1e-4, rtol=1e-4)
                self.answers.append(("OK", ok))
            except grpc.RpcError as e:
                self.answers.append((e.code().name, False))

    def wait_for(self, more: int, timeout: float = 120.0) -> None:
        target = len(self.answers) + more
        end = time.monotonic() + timeout
        while len(self.answers) < target and time.monotonic() < end:
            time.sleep(0.05)
        assert len(self.answers) >= target, f"only {len(self.answers)} answers"

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=150)


class Probe:
    """grpc.health.v1 Check every 50 ms with a 1 s deadline: what it said, how fast."""

    def __init__(self, client: InferenceClient) -> None:
        self.client = client
        self.seen: list[str] = []
        self.slowest = 0.0
        self.timeouts = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self.stop.is_set():
            t0 = time.monotonic()
            try:
                status = self.client.health(timeout=1.0)
                self.slowest = max(self.slowest, time.monotonic() - t0)
                if not self.seen or self.seen[-1] != status:
                    self.seen.append(status)
            except grpc.RpcError:
                self.timeouts += 1
            time.sleep(0.05)

    def wait_until(self, status: str, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while (not self.seen or self.seen[-1] != status) and time.monotonic() < end:
            time.sleep(0.02)
        assert self.seen and self.seen[-1] == status, self.seen

    def __enter__(self) -> Probe:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(timeout=5)


def test_killed_worker_then_spent_restarts_lose_nothing_and_health_follows(ray_cluster, tmp_path):
    model, x = mlp_block(batch=2, seq=4)
    spec = ClusterSpec.from_dict(CLUSTER)
    cm = hetero.compile(
        model,
        x,
        cluster=spec,
        backends={"cpu": "eager", "npu": "eager"},
        cache_dir=tmp_path,
        executor="ray",
    )
    ex = cm.executor
    ex.watch_s = 0.2
    server = HeteroServer(
        ModelServable(cm), ServerOptions(port=0, health_poll=0.05, workers=2, deadline=120)
    )
    server.start()
    client = InferenceClient(server.address)
    try:
        assert client.wait_serving(timeout=30)
        with Probe(client) as probe, Load(client, model) as load:
            load.wait_for(20)
            # 1. a worker killed under load: Ray restarts it, the graph is rebuilt
            device = next(iter(ex.workers))
            ray.kill(ex.workers[device], no_restart=False)
            probe.wait_until("NOT_SERVING", timeout=30)
            probe.wait_until("SERVING")
            load.wait_for(20)
            # 2. its restarts spent (as after repeated crashes): the device is gone for good
            before = {s.device.name for s in ex.stages}
            ray.kill(ex.workers[device], no_restart=True)
            probe.wait_until("NOT_SERVING", timeout=30)
            probe.wait_until("SERVING")
            load.wait_for(20)
        after = {s.device.name for s in ex.stages}
        assert device in before and device not in after and len(ex.history) == 1
        codes = Counter(code for code, _ in load.answers)
        assert codes == Counter({"OK": len(load.answers)}), codes  # 0 lost
        assert all(ok for _, ok in load.answers)  # 0 wrong
        assert probe.seen[:5] == ["SERVING", "NOT_SERVING", "SERVING", "NOT_SERVING", "SERVING"]
        assert probe.timeouts == 0 and probe.slowest < 1.0
        print(f"answers {len(load.answers)}, health {probe.seen}, slowest {probe.slowest:.3f} s")
        assert cm.status() == ("ready", "")
    finally:
        client.close()
        server.shutdown(grace=1.0)


def test_actor_inputs_are_validated_and_reported_as_the_callers(ray_cluster, tmp_path):
    """The Ray actor way in checks values like gRPC does; a wrong input comes back as the
    caller's InvalidInput (not a partition failure), directly and through its gRPC front,
    and the deployment keeps answering."""
    from hetero.errors import InvalidInput
    from hetero.interfaces.models import TinyGPT
    from hetero.interfaces.serving import ActorServable

    torch.manual_seed(0)
    model = TinyGPT(vocab=64, dim=32, heads=2, layers=1, ctx=16).eval()
    idx = torch.randint(0, 64, (1, 8))
    cm = hetero.compile(model, (idx,), backends={"cpu": "eager"}, cache_dir=tmp_path)
    handle = hetero.deploy(cm)
    bad = idx.clone()
    bad[0, 2] = 2**31
    for call in (lambda: handle.infer.remote(bad), lambda: handle.run_flat.remote({"idx": bad})):
        with pytest.raises(InvalidInput, match=r"'idx'.*element \[0, 2\].*\[0, 64\)"):
            ray.get(call(), timeout=120)
    with pytest.raises(InvalidInput, match="captured with 1 input"):
        ray.get(handle.infer.remote(idx, idx), timeout=60)
    server = HeteroServer(ActorServable(handle), ServerOptions(port=0, health_poll=0.05))
    server.start()
    client = InferenceClient(server.address)
    try:
        assert client.wait_serving(timeout=60)
        with pytest.raises(grpc.RpcError) as info:
            client.infer({"idx": bad}, timeout=60)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "element [0, 2]" in info.value.details()
        with torch.no_grad():
            want = model(idx)
        torch.testing.assert_close(client.infer({"idx": idx}, timeout=60)["output0"], want)
        torch.testing.assert_close(ray.get(handle.infer.remote(idx), timeout=60), want)
    finally:
        client.close()
        server.shutdown(grace=1.0)
        ray.kill(handle)
        cm.shutdown()


def test_with_no_device_left_the_error_names_the_lost_one(ray_cluster, tmp_path):
    model, x = mlp_block(batch=2, seq=4)
    spec = ClusterSpec.from_dict({**CLUSTER, "hosts": CLUSTER["hosts"][:1]})  # head/cpu only
    cm = hetero.compile(
        model, x, cluster=spec, backends={"cpu": "eager"}, cache_dir=tmp_path, executor="ray"
    )
    cm.executor.watch_s = 0.2
    server = HeteroServer(ModelServable(cm), ServerOptions(port=0, health_poll=0.05))
    server.start()
    client = InferenceClient(server.address)
    try:
        assert client.wait_serving(timeout=30)
        ray.kill(cm.executor.workers["head/cpu"], no_restart=True)
        end = time.monotonic() + 60
        while cm.status()[0] != "failed" and time.monotonic() < end:
            time.sleep(0.1)
        state, why = cm.status()
        assert state == "failed" and "no device is left" in why and "head/cpu" in why, why
        # health follows the state at the server's next poll (every 0.05 s here)
        end = time.monotonic() + 5
        while client.health() != "NOT_SERVING" and time.monotonic() < end:
            time.sleep(0.05)
        assert client.health() == "NOT_SERVING"
        with pytest.raises(grpc.RpcError) as info:
            client.infer({"x": x[0]}, timeout=30)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "head/cpu" in info.value.details()
        model_info = client.model_info()
        assert model_info.state == "failed" and "head/cpu" in model_info.error
    finally:
        client.close()
        server.shutdown(grace=1.0)
