"""Benchmark sections in child processes that cannot outlive their time limit.

Ray 2.60 and NCCL set-up can block without a timeout, and a GPU benchmark that hangs would
spend the whole device call: each section runs as a child in a session of its own, killed
with everything it spawned (Ray's raylet and workers included) when it ends or runs out of
time; what it wrote to its JSON file is kept either way.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path


def run_bounded(
    cmd: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[dict, str, int]:
    """Run `cmd` + `--child-json PATH` in its own session for at most `timeout` seconds.

    Returns (the JSON the child wrote to PATH, or {}; why it failed, or ""; how many of its
    session's processes were still alive after SIGKILL)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    proc = subprocess.Popen([*cmd, "--child-json", path], start_new_session=True, env=env)
    why = ""
    try:
        rc = proc.wait(timeout=timeout)
        if rc:
            why = f"child exited with {rc}"
    except subprocess.TimeoutExpired:
        why = f"child killed after {timeout:.0f} s (hung or out of time)"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        left = end_session(proc.pid)  # Ray's workers run in process groups of their own
    text = Path(path).read_text() if Path(path).exists() else ""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return json.loads(text or "{}"), why, left


def session_members(sid: int) -> list[int]:
    """Processes of session `sid` (Linux /proc): a child started with start_new_session
    and everything it spawned, Ray workers included (they leave its process group)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            after = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(after[3]) == sid and int(entry) != os.getpid():  # state ppid pgrp session
            out.append(int(entry))
    return out


def end_session(sid: int, wait_s: float = 10.0) -> int:
    """SIGKILL what is left of the child's session; wait until it is gone (GPU memory)."""
    left = session_members(sid) if os.path.isdir("/proc") else []
    for pid in left:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.time() + wait_s
    while left and time.time() < deadline:
        time.sleep(0.2)
        left = [p for p in session_members(sid) if not _zombie(p)]
    return len(left)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
