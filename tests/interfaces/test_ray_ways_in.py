"""The Ray ways in against a real `ray start --head` this module starts (token auth on):
`hetero submit` runs a job whose deployment answers, `hetero.deploy` from one driver is
called from a second, `hetero status` / `hetero stop` manage them.

Everything that talks to Ray runs in subprocesses, so this module never initialises Ray in
the test process (the session's own Ray cluster fixture stays untouched).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from cluster_fakes import write_config

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(300)]

BIN = Path(sys.executable).parent


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def head():
    """A private Ray head on this machine: its env (token), GCS and dashboard addresses."""
    gcs, dashboard, client, agent = _free_ports(4)
    temp = tempfile.mkdtemp(prefix="hr", dir="/tmp")  # short: Ray's socket paths are limited
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=secrets.token_hex(16),
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` in job entrypoints
        RAY_USAGE_STATS_ENABLED="0",
    )
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
        f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        "--include-dashboard=true", "--num-cpus=2", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--temp-dir={temp}",
    ]  # fmt: skip
    log = open(Path(temp) / "head.log", "w")  # noqa: SIM115 (closed in teardown)
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{dashboard}"
    end = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # 401 without the token: the job API is up
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > end:
                text = (Path(temp) / "head.log").read_text()
                raise AssertionError(f"ray head did not start: {text}") from None
            time.sleep(0.5)
    yield {"env": env, "gcs": f"127.0.0.1:{gcs}", "jobs": url, "temp": temp}
    proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # the head's own process group, nothing else
    log.close()
    shutil.rmtree(temp, ignore_errors=True)


def _run(head, args: list[str], timeout: float = 180) -> subprocess.CompletedProcess:
    result = subprocess.run(
        args, env={**head["env"], "COLUMNS": "200"}, capture_output=True, text=True, timeout=timeout
    )
    return result


def _python(head, code: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return _run(head, [sys.executable, "-c", textwrap.dedent(code)], timeout)


# The second driver: finds the deployment the job's driver started with hetero.deploy,
# calls it through Ray and through its gRPC endpoint, lists it, then stops it.
SECOND_DRIVER = """
    import ray, torch
    from hetero.interfaces import deploy, jobs
    from hetero.interfaces.models import mlp_block
    from hetero.interfaces.serving import InferenceClient
    from hetero.errors import HeteroError
    ray.init(address="{gcs}", log_to_driver=False)
    h = ray.get_actor("{name}", namespace="hetero")
    model, _ = mlp_block(batch=2, seq=4)
    x = torch.randn(2, 4, 256)
    torch.testing.assert_close(ray.get(h.infer.remote(x), timeout=60), model(x), rtol=1e-4, atol=1e-5)
    info = ray.get(h.info.remote())
    with InferenceClient(info["grpc"]) as c:
        assert c.health() == "SERVING"
        out = c.infer({{"x": x}}, timeout=30)
        torch.testing.assert_close(out["output0"], model(x), rtol=1e-4, atol=1e-5)
    listed = {{r["name"]: r for r in deploy.list_deployments()}}
    assert listed["{name}"]["ready"], listed
    assert [j["status"] for j in jobs.list_jobs("{jobs}", "{name}")] == ["SUCCEEDED"]
    deploy.stop("{name}")
    try:
        deploy.find("{name}")
        raise SystemExit("still there after stop")
    except HeteroError:
        pass
    print("SECOND DRIVER OK", info["grpc"])
"""


def test_a_submitted_job_deploys_and_a_second_driver_uses_the_actor(head, tmp_path):
    """`hetero submit` -> a job whose driver calls hetero.deploy(config, name, detached=True);
    a second Ray driver (another process) finds the actor by name and calls it."""
    cfg = write_config(tmp_path, name="job.yaml")
    submitted = _run(head, [str(BIN / "hetero"), "submit", str(cfg), "--address", head["jobs"],
                            "--name", "mlp-job", "--timeout", "240"])  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout + submitted.stderr
    assert "SUCCEEDED" in submitted.stderr and "is ready" in submitted.stdout
    code = SECOND_DRIVER.format(gcs=head["gcs"], jobs=head["jobs"], name="mlp-job")
    driver = _python(head, code)
    assert "SECOND DRIVER OK" in driver.stdout, driver.stdout + driver.stderr
    jobs = _run(head, [str(BIN / "hetero"), "status", "--address", head["jobs"]])
    assert jobs.returncode == 0 and "mlp-job" in jobs.stdout and "SUCCEEDED" in jobs.stdout
