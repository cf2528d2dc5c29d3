"""The card's turn: an exclusive lock another process waits on, and nothing on a CPU."""

from __future__ import annotations

import fcntl
import subprocess
import sys
import textwrap

import torch

from hetero.backends.gpu_turn import held, timing_turn

_HOLDER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from hetero.backends.gpu_turn import held
    with held(Path(sys.argv[1])):
        print("held", flush=True)
        sys.stdin.readline()  # until the test lets go
    print("released", flush=True)
    """
)


def _try_lock(path) -> bool:
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_a_turn_held_by_another_process_is_not_taken_until_it_lets_go(tmp_path):
    path = tmp_path / "card.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        assert not _try_lock(path)
        holder.stdin.write("\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        with held(path):  # taken now, and held against the next one (another open file)
            assert not _try_lock(path)
    finally:
        holder.kill()
        holder.wait()


def test_a_turn_whose_holder_died_is_free(tmp_path):
    path = tmp_path / "card.lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    assert holder.stdout.readline().strip() == b"held"
    holder.kill()
    holder.wait()
    assert _try_lock(path)


def test_on_a_cpu_there_is_no_turn_to_wait_for():
    with timing_turn(torch.device("cpu")):
        pass
