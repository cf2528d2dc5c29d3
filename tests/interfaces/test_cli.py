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
        [HETERO, "serve", str(cfg), "--port", "0", "--http-port", "0"],
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


def test_version_answers_at_once_and_help_stays_under_a_second():
    code = (
        "import sys\n"
        "from hetero.interfaces.cli import main\n"
        "sys.argv = ['hetero', '--version']\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('LOADED', sorted(m for m in ('torch', 'pint', 'ray') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("hetero 0.") and "LOADED []" in out.stdout, out.stdout + out.stderr
    best = min(_seconds([HETERO, "--help"]) for _ in range(3))
    assert best < 1.0, f"hetero --help took {best:.2f} s"


def _seconds(argv: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(argv, capture_output=True, check=True, timeout=60)
    return time.perf_counter() - start


def test_every_command_speaks_one_vocabulary():
    """--cluster/--objective wherever a config is planned, --json wherever a table is
    printed, --out/-o for every file written, one --runs default."""
    from hetero.interfaces.cli import COMMANDS, load_command
    from hetero.interfaces.commands.options import RUNS

    def options(name: str) -> dict[str, object]:
        return {
            opt: p for p in load_command(name).params for opt in getattr(p, "opts", [])
        }  # fmt: skip

    for name in ("plan", "compile", "run", "verify", "bench", "demo", "deploy", "serve"):
        assert {"--cluster", "--objective"} <= set(options(name)), name
    for name in ("plan", "compile", "run", "verify", "bench", "calibrate", "demo", "status"):
        assert "--json" in options(name), name
    for name in ("plan", "bench", "calibrate", "demo"):
        opts = options(name)  # each load builds new objects: compare within one
        assert "-o" in opts and opts["-o"] is opts["--out"], name
    assert all("--output" not in options(n) for n in COMMANDS)
    assert {options(n)["--runs"].default for n in ("bench", "run", "demo")} == {RUNS}


def test_tables_keep_their_cells_when_piped_and_json_replaces_them(tmp_path):
    cfg = write_config(tmp_path)
    runner = CliRunner()
    piped = runner.invoke(app, ["plan", str(cfg)], env={"COLUMNS": ""})
    assert piped.exit_code == 0, piped.output
    header = next(line for line in piped.stdout.splitlines() if "part" in line and "device" in line)
    for column in ("backend", "weights", "predicted ms", "measured ms", "memory", "receives"):
        assert column in header, header  # at 80 columns rich wraps these headers
    as_json = runner.invoke(app, ["plan", str(cfg), "--json", "-o", str(tmp_path / "p.json")])
    assert as_json.exit_code == 0, as_json.output
    data = json.loads(as_json.stdout)
    assert data["partitions"] and data["written"]["plan"] == str(tmp_path / "p.json")
    verified = runner.invoke(app, ["verify", str(cfg), "--json"])
    assert verified.exit_code == 0, verified.output
    assert json.loads(verified.stdout)["ok"] is True
    ran = runner.invoke(app, ["run", str(cfg), "--runs", "3", "--warmup", "0", "--json"])
    assert ran.exit_code == 0, ran.output
    ms = json.loads(ran.stdout)["ms"]
    assert 0 < ms["p10"] <= ms["p50"] <= ms["p90"]


def test_cluster_and_objective_override_the_config(tmp_path):
    cfg = write_config(tmp_path)
    runner = CliRunner()
    other = str(Path(__file__).resolve().parents[2] / "configs/clusters/dev-box-npu.yaml")
    result = runner.invoke(
        app,
        ["plan", str(cfg), "--cluster", other, "--objective", "throughput", "--json"],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["cluster"] == "dev-box-npu" and data["objective"] == "throughput"
    bad = runner.invoke(app, ["plan", str(cfg), "--cluster", "nowhere.yaml"])
    assert bad.exit_code != 0 and "--cluster: no cluster file nowhere.yaml" in str(bad.exception)


def test_bench_runs_under_the_cli_thread_settings_and_reports_its_spread(tmp_path):
    cfg = write_config(tmp_path)
    unset = ("TVM_BIND_THREADS", "GOMP_SPINCOUNT", "HETERO_THREAD_DEFAULTS", "HETERO_OWN_CORES",
             "PYTHONWARNINGS")  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = subprocess.run(
        [HETERO, "bench", str(cfg), "--runs", "5", "--json"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    for key in ("eager", "compiled"):
        assert 0 < data[key]["p10"] <= data[key]["p50"] <= data[key]["p90"]
    assert data["compiled_ms"] == data["compiled"]["p50"]
    threads = data["threads"]
    assert threads["env"]["TVM_BIND_THREADS"] == "0"  # set by the CLI itself
    assert threads["env"]["GOMP_SPINCOUNT"] == "0"  # no spin: the cores may not be its own
    assert threads["torch"] >= 1 and threads["devices"] == {"box/cpu": 2}
    assert out.stderr == "", out.stderr  # nothing but the result


def test_verbosity_sets_hetero_and_ray_logging(capsys):
    import logging

    from hetero.cluster.connect import ray_log_level
    from hetero.interfaces.terminal import set_verbosity

    logger = logging.getLogger("hetero")
    before = logger.level
    try:
        assert set_verbosity() == logging.WARNING and ray_log_level() == logging.WARNING
        logging.getLogger("hetero.test").warning("a thing to know")
        logging.getLogger("hetero.test").info("a thing done")
        assert capsys.readouterr().err == "warning: a thing to know\n"
        set_verbosity(verbose=1)
        assert ray_log_level() == logging.INFO
        logging.getLogger("hetero.test").info("a thing done")
        assert capsys.readouterr().err == "info hetero.test: a thing done\n"
        set_verbosity(quiet=True)
        assert ray_log_level() == logging.ERROR
        logging.getLogger("hetero.test").warning("a thing to know")
        assert capsys.readouterr().err == ""
        assert CliRunner().invoke(app, ["-q", "--version"]).exit_code == 0
    finally:
        logger.setLevel(before)
