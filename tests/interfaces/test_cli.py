"""The CLI ways in against real processes: `hetero serve`, `hetero bench`; safe Ray defaults."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
import torch
from cluster_fakes import write_config
from typer.testing import CliRunner

from hetero.backends.eager import EagerBackend
from hetero.cluster.connect import init_ray, safe_head_env
from hetero.errors import CompileError
from hetero.interfaces.cli import app
from hetero.interfaces.config import load_config
from hetero.interfaces.deploy import build_compiled
from hetero.interfaces.models import mlp_block
from hetero.interfaces.serving import InferenceClient, LoadingServable, ModelServable

HETERO = str(Path(sys.executable).with_name("hetero"))


def _wait_for_address(proc: subprocess.Popen, timeout: float = 120) -> str:
    end = time.monotonic() + timeout
    seen = []
    while time.monotonic() < end:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            break
        seen.append(line)
        m = re.search(r"serving on (127\.0\.0\.1:\d+)", line)
        if m:
            return m.group(1)
    proc.kill()
    raise AssertionError("hetero serve never said where it listens:\n" + "".join(seen))


def test_hetero_serve_answers_correctly_and_drains_on_sigterm(tmp_path):
    cfg = write_config(tmp_path)
    proc = subprocess.Popen(
        [HETERO, "serve", str(cfg), "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        address = _wait_for_address(proc)
        with InferenceClient(address) as client:
            assert client.wait_serving(timeout=120), "never became SERVING"
            info = client.model_info()
            assert info.state == "ready" and len(info.partitions) >= 1 and info.plan_summary
            model, _ = mlp_block(batch=2, seq=4)  # same seed: the same weights
            x = torch.randn(2, 4, 256)
            out = client.infer({info.inputs[0].name: x}, timeout=30)
            torch.testing.assert_close(out[info.outputs[0].name], model(x), rtol=1e-4, atol=1e-5)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "draining" in err and "served 1 requests" in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_partition_that_fails_to_compile_is_reported_not_served(tmp_path, monkeypatch, serve):
    def fail(self, *args, **kwargs):
        raise CompileError("partition 0 (eager on box/cpu): injected compiler failure")

    monkeypatch.setattr(EagerBackend, "compile", fail)
    cfg = load_config(write_config(tmp_path))
    loading = LoadingServable(lambda: ModelServable(build_compiled(cfg)), name="mlp")
    assert loading.wait(120)
    _, client = serve(loading, wait=False)
    time.sleep(0.3)
    assert client.health() == "NOT_SERVING"
    info = client.model_info()
    assert info.state == "failed" and "injected compiler failure" in info.error
    with pytest.raises(grpc.RpcError) as err:
        client.infer({"x": torch.randn(2, 4, 256)})
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_bench_prints_json_with_predicted_and_measured(tmp_path):
    cfg = write_config(tmp_path)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(app, ["bench", str(cfg), "--runs", "2", "--json", "-o", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    assert data["eager_ms"] > 0 and data["compiled_ms"] > 0 and data["max_abs_diff"] < 1e-3
    assert data["partitions"] and all(p["predicted_ms"] >= 0 for p in data["partitions"])
    assert json.loads(result.stdout)["model"] == "hetero.interfaces.models:mlp_block"


def test_a_ray_head_hetero_starts_is_private_with_token_auth(monkeypatch):
    import ray

    import hetero.cluster.connect as connect_module

    seen = {}
    # Re-reading Ray's config would leave token auth on in this process for the later Ray
    # tests' clusters (their processes start without the token): only the env is checked.
    monkeypatch.setattr(connect_module, "_refresh_ray_config", lambda: None)
    # Likewise pinning Ray to loopback would stay on for the later tests' Ray clusters.
    pinned = []
    monkeypatch.setattr(connect_module, "_pin_to_loopback", lambda: pinned.append(True))
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(
        ray, "init", lambda **kw: seen.update(kw, env=os.environ.get("RAY_AUTH_MODE"))
    )
    # setenv then delenv: undoing both restores the variable whatever init_ray wrote
    monkeypatch.setenv("RAY_AUTH_MODE", "placeholder")
    monkeypatch.delenv("RAY_AUTH_MODE")
    init_ray(None)
    assert seen["address"] == "local" and seen["include_dashboard"] is False
    assert seen["env"] == "token"
    assert pinned and "_node_ip_address" not in seen  # the head advertises 127.0.0.1 ...
    init_ray(None, host="10.0.0.7")
    assert seen["_node_ip_address"] == "10.0.0.7"  # ... unless ray.head_host says otherwise
    assert safe_head_env({})["RAY_AUTH_MODE"] == "token"
    assert safe_head_env({"RAY_AUTH_MODE": "disabled"})["RAY_AUTH_MODE"] == "disabled"  # explicit


def test_help_lists_every_command_without_loading_them():
    """`hetero --help` reads the command table; a command's module loads when it runs."""
    from hetero.interfaces.cli import COMMANDS, load_command

    for name, (_, summary) in COMMANDS.items():
        first = " ".join((load_command(name).help or "").split("\n\n")[0].split())
        assert summary == first, f"hetero {name}: the table says {summary!r}, the command {first!r}"
    code = (
        "import sys\n"
        "from hetero.interfaces.cli import main\n"
        "sys.argv = ['hetero', '--help']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'hetero.interfaces.commands.plan') "
        "if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "LOADED []" in out.stdout and "calibrate" in out.stdout, out.stdout + out.stderr
