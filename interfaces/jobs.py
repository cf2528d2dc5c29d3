"""Ray job submission: compile and deploy a config on a cluster through its job API.

`submit()` bundles the config (and the files it names) into the job's runtime_env,
submits `python -m hetero.interfaces.jobs run deploy.yaml --name NAME`, follows the logs
and returns the job's final status. The job compiles on the cluster, starts a detached,
named deployment actor (and its gRPC endpoint) and exits; the deployment stays up until
`hetero stop NAME`.

Ray's job API has no authentication (CVE-2023-48022): whoever reaches the dashboard
port can run code on the cluster. Submit only to clusters on a trusted network.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from hetero.cluster.connect import NAMESPACE, init_ray
from hetero.errors import HeteroError
from hetero.interfaces.config import DeployConfig, load_config
from hetero.interfaces.deploy import deploy, stop

BUNDLE_CONFIG = "deploy.yaml"
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def bundle(cfg: DeployConfig, dest: Path) -> Path:
    """Write `cfg` into `dest` with every file it names copied beside it (relative paths)."""
    dest.mkdir(parents=True, exist_ok=True)
    data = cfg.model_dump(mode="json", exclude={"source"}, exclude_none=True)
    if cfg.cluster.endswith((".yaml", ".yml")):
        shutil.copy(cfg.cluster, dest / "cluster.yaml")
        data["cluster"] = "cluster.yaml"
    elif cfg.is_ray:
        data["cluster"] = "auto"  # the job runs inside the cluster it was submitted to
    if cfg.is_exported_file:
        shutil.copy(cfg.model, dest / "model.pt2")
        data["model"] = "model.pt2"
    data.pop("cache_dir", None)  # a path of the submitting machine means nothing there
    (dest / BUNDLE_CONFIG).write_text(yaml.safe_dump(data, sort_keys=False))
    return dest / BUNDLE_CONFIG


def _client(address: str):
    try:
        # optional (hetero[ray]): loaded on first use
        from ray.job_submission import JobSubmissionClient
    except ImportError as e:
        raise HeteroError(f"job submission needs ray[default] ({e})") from None
    try:
        return JobSubmissionClient(address)
    except Exception as e:  # connection refused, wrong scheme, auth failure
        raise HeteroError(
            f"cannot reach the Ray job API at {address}: {e}. It is the dashboard address, "
            "e.g. http://HEAD:8265"
        ) from None


def submit(
    config: str | Path | DeployConfig,
    address: str,
    name: str | None = None,
    follow: bool = True,
    timeout: float | None = None,
    out: Callable[[str], None] = lambda s: print(s, end="", flush=True),
) -> tuple[str, str]:
    """Submit the deployment as a Ray job; returns (job id, final or current status)."""
    cfg = config if isinstance(config, DeployConfig) else load_config(config)
    name = name or cfg.deployment_name
    client = _client(address)
    entrypoint = f"{cfg.ray.python} -m hetero.interfaces.jobs run {BUNDLE_CONFIG} --name {name}"
    with tempfile.TemporaryDirectory(prefix="hetero-job-") as tmp:
        bundle(cfg, Path(tmp))
        job_id = client.submit_job(
            entrypoint=entrypoint,
            runtime_env={"working_dir": tmp},
            submission_id=f"hetero-{name}-{int(time.time() * 1000)}",
            metadata={"hetero": "deploy", "deployment": name},
        )
    if not follow:
        return job_id, str(client.get_job_status(job_id))
    return job_id, wait(client, job_id, timeout=timeout, out=out)


def wait(
    client: Any,
    job_id: str,
    timeout: float | None = None,
    out: Callable[[str], None] = lambda s: print(s, end="", flush=True),
) -> str:
    """Print the job's logs as they grow until it ends; returns SUCCEEDED/FAILED/STOPPED."""
    end = None if timeout is None else time.monotonic() + timeout
    shown = 0
    while True:
        state = client.get_job_status(job_id)
        status = str(getattr(state, "value", state))
        logs = client.get_job_logs(job_id)
        if len(logs) > shown:
            out(logs[shown:])
            shown = len(logs)
        if status in TERMINAL:
            return status
        if end is not None and time.monotonic() > end:
            raise HeteroError(f"job {job_id} is still {status} after {timeout:.0f} s")
        time.sleep(0.5)


def list_jobs(address: str, name: str | None = None) -> list[dict[str, Any]]:
    """hetero's jobs on the cluster (newest first), optionally of one deployment."""
    rows = []
    for job in _client(address).list_jobs():
        meta = job.metadata or {}
        if meta.get("hetero") != "deploy" or (name and meta.get("deployment") != name):
            continue
        rows.append(
            {
                "job": job.submission_id,
                "deployment": meta.get("deployment", ""),
                "status": str(getattr(job.status, "value", job.status)),
                "start_time": job.start_time or 0,
                "message": job.message or "",
            }
        )
    return sorted(rows, key=lambda r: r["start_time"], reverse=True)


def stop_via_jobs(address: str, name: str, python: str = "python", timeout: float = 120) -> str:
    """Stop a deployment through the job API: end its running jobs, then a job that ends it."""
    client = _client(address)
    for row in list_jobs(address, name):
        if row["status"] not in TERMINAL:
            client.stop_job(row["job"])
    job_id = client.submit_job(
        entrypoint=f"{python} -m hetero.interfaces.jobs stop --name {name}",
        submission_id=f"hetero-stop-{name}-{int(time.time() * 1000)}",
        metadata={"hetero": "stop", "deployment": name},
    )
    return wait(client, job_id, timeout=timeout, out=lambda _s: None)


# ---- what runs on the cluster -------------------------------------------------------------------


def _run(config: str, name: str, serve: bool) -> int:
    import ray  # optional (hetero[ray]): loaded on first use

    cfg = load_config(config)
    init_ray("auto", namespace=cfg.ray.namespace or NAMESPACE)
    print(f"[hetero] deploying {cfg.model} as {name!r} (namespace {cfg.ray.namespace})", flush=True)
    handle = deploy(cfg, name=name, detached=True)
    try:
        ready = ray.get(handle.ready.remote())
        info = ray.get(handle.info.remote())
    except Exception as e:  # the actor failed to compile or load: the job fails with it
        print(f"[hetero] deployment {name!r} failed: {e}", file=sys.stderr, flush=True)
        ray.kill(handle, no_restart=True)
        return 1
    print(info.get("plan_summary", ""), flush=True)
    if serve:
        address = ray.get(handle.serve.remote())
        print(f"[hetero] gRPC endpoint of {name!r}: {address} (on its node)", flush=True)
    print(f"[hetero] deployment {name!r} is {'ready' if ready else 'NOT ready'}", flush=True)
    return 0 if ready else 1


def _stop(name: str, namespace: str) -> int:
    init_ray("auto", namespace=namespace)
    stop(name, namespace)
    print(f"[hetero] stopped deployment {name!r}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hetero.interfaces.jobs")
    sub = parser.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="compile and deploy a config (inside a Ray job)")
    run.add_argument("config")
    run.add_argument("--name", required=True)
    run.add_argument("--no-grpc", action="store_true", help="do not start the gRPC endpoint")
    stop = sub.add_parser("stop", help="end a named deployment")
    stop.add_argument("--name", required=True)
    stop.add_argument("--namespace", default="hetero")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "run":
            return _run(args.config, args.name, serve=not args.no_grpc)
        return _stop(args.name, args.namespace)
    except HeteroError as e:
        print(f"[hetero] error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
