"""backends/warming.py's Standby: a warming process started before its work is known gets
its arguments on stdin when the work exists, ends quietly when none comes, and is not
handed work once it has ended."""

from __future__ import annotations

import importlib.util
import json
import py_compile
import time

import pytest

from hetero.backends.warming import (
    MARK,
    STANDBY,
    Standby,
    Warming,
    bytecode_advice,
    marked_steps,
)

# A warming module that only writes down the arguments it got (or that it got none).
FAKE = f"""
import json, sys, time
from pathlib import Path
out = Path(sys.argv[0]).with_name("got.json")
argv = sys.argv[1:]
if argv == [{STANDBY!r}]:
    line = sys.stdin.readline()
    argv = json.loads(line) if line.strip() else None
out.write_text(json.dumps(argv))
if argv and argv[0] == "done-then-linger":  # its work done, a slow end (a GPU's teardown)
    from hetero.backends.warming import DONE, mark
    mark(DONE)
    time.sleep(float(argv[1]))
    sys.exit(5)
sys.exit(3 if argv == ["fail"] else 0)
"""


@pytest.fixture
def fake_module(tmp_path, monkeypatch):
    (tmp_path / "fake_warm.py").write_text(FAKE)
    # the fake imports hetero as a warming module does (an editable install: on sys.path)
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    return tmp_path / "got.json"


def test_a_standby_gets_its_arguments_when_started(fake_module):
    standby = Standby("fake_warm")
    warming = standby.start(["/some/artifact", "2"])
    assert warming is not None and warming.wait(timeout_s=60)
    assert json.loads(fake_module.read_text()) == ["/some/artifact", "2"]
    assert standby.start(["again"]) is None  # handed over once only
    standby.close()  # a no-op after the hand-over


def test_a_standby_closed_unused_ends_without_work(fake_module):
    standby = Standby("fake_warm")
    proc = standby._proc
    standby.close()
    assert proc is not None and proc.returncode is not None
    assert standby.start(["late"]) is None


def test_a_standby_that_ended_is_not_handed_work(fake_module, monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")  # `python -m fake_warm` fails at once
    standby = Standby("fake_warm")
    deadline = time.monotonic() + 30
    while standby._proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert standby.start(["/some/artifact", "2"]) is None  # the caller starts a fresh one
    assert not fake_module.exists()


def test_a_failed_warming_reports_false(fake_module):
    warming = Standby("fake_warm").start(["fail"])
    assert warming is not None and not warming.wait(timeout_s=60)


def test_a_warming_that_marked_done_is_waited_for_no_longer(fake_module):
    # the parent goes on at the mark, not at the process's end 30 s later; the process,
    # still ending, is reaped once it has (its exit status no longer matters)
    for warming in (Standby("fake_warm").start(["done-then-linger", "30"]),
                    Warming("fake_warm", ["done-then-linger", "30"])):  # fmt: skip
        assert warming is not None
        start = time.monotonic()
        assert warming.wait(timeout_s=60)
        assert time.monotonic() - start < 20
        assert warming._proc.poll() is None  # still ending
        warming.cancel()
        assert warming._proc.returncode is not None


def test_the_steps_a_warming_marked_are_read_as_seconds_since_it_started():
    err = (
        f"some warning\n{MARK} ready 1009.25 \n{MARK} read 1012.5\n"
        f"{MARK} broken x\n{MARK} compiled-and-run 1020.0\n"
    ).encode()
    assert marked_steps(err, spawned=1000.0, handed=1006.0) == (
        "handed over +6.0 s, ready +9.2 s, read +12.5 s, compiled-and-run +20.0 s"
    )
    assert marked_steps(f"{MARK} ready 1003.0".encode(), spawned=1000.0, handed=1006.0) == (
        "ready +3.0 s, handed over +6.0 s"
    )
    assert marked_steps(b"", spawned=5.0, handed=5.0) == "handed over +0.0 s"


def test_where_warmings_would_compile_torch_from_source_the_advice_says_how_to_avoid_it(
    tmp_path,
):
    source = tmp_path / "pkg" / "__init__.py"
    source.parent.mkdir()
    source.write_text("x = 1\n")
    advice = bytecode_advice(str(source))
    assert advice is not None and "python -m compileall" in advice and str(tmp_path) in advice
    py_compile.compile(str(source), cfile=importlib.util.cache_from_source(str(source)))
    assert bytecode_advice(str(source)) is None
