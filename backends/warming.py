"""A backend's lazy compile started in another process while this one does other work.

Inductor compiles a program on its first call, and its compile holds Python's lock and
torch's process-wide tracing state: a thread cannot run it beside TVM's compile (measured:
a 4-layer GPT-2's TVM compile took 5.3 s alone and 35 s beside a Python loop in another
thread). A process can. It compiles the same saved program with the same settings, so its
kernels land in Inductor's on-disk caches (FX graph and AOTAutograd), and this process's
own compile of it later reads them back: GPT-2 small's program took 21.5 s cold and 5.7 s
warm on the 2-core dev box. The measured choice (runtime/choice.py) starts one for each
candidate that offers it before it compiles the others, and waits for it before loading
that candidate.

A fresh process pays for more than the compile: on the dev box, importing torch and
Inductor took 4.3 s, Inductor's probe of the CPU's vector instructions (it compiles and runs
a test program per instruction set) 3.0 s and the first compile's own set-up about 1.8 s
more, about 9 s before GPT-2's 17-20 s compile began. A `Standby` is such a process started
before its program exists (while the model is planned and the artifact written): it gets
ready, then waits for its arguments.

A warming is only ever a head start: if it fails, is slow, or its cache entries miss, the
load compiles as it would have.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

# Longest the choice waits for a warming before loading without it (the load then compiles
# itself, as with no warming); a 7B partition's compile is minutes, a small one's seconds.
WAIT_S = 600.0
# The only argument of a warming module started as a Standby: get ready, then read the real
# arguments (one JSON list) from stdin; an end of input instead means there is no work.
STANDBY = "--standby"
# How a warming process marks on its stderr the moment it reached a step (`mark`), so the
# log says where its time went: imported, ready, program read, done.
MARK = "hetero-warming-mark"
# The step a warming marks once its work is in the caches: its parent goes on from there
# and the process ends on its own. The end of a process that compiled on a GPU (the
# interpreter's teardown, Inductor's compile workers, the CUDA context) took 2.5-4.2 s after
# its work was done, all of it on the compile's critical path (backend_suite.md, run 51).
DONE = "done"


def mark(step: str) -> None:
    """Writes, from inside a warming process, that it has reached `step` now (wall clock,
    which its parent reads against its own)."""
    print(f"{MARK} {step} {time.time():.3f}", file=sys.stderr, flush=True)


def marked_steps(err: bytes, spawned: float, handed: float) -> str:
    """When a warming process, `spawned` and `handed` its work at those wall clock times,
    reached the steps it marked on its stderr, in seconds since it was spawned and in the
    order they came: "imported +2.0 s, handed over +5.1 s, ready +5.4 s, read +5.6 s, ..."
    (a standby ready after its hand-over kept its work waiting)."""
    steps = [(handed, "handed over")]
    for line in err.splitlines():
        if got := _marked(line):
            steps.append((got[1], got[0]))
    return ", ".join(f"{step} +{at - spawned:.1f} s" for at, step in sorted(steps))


def _marked(line: bytes) -> tuple[str, float] | None:
    """(step, wall clock) where `line` is a `mark`, else None."""
    parts = line.decode(errors="replace").split()
    if len(parts) != 3 or parts[0] != MARK:
        return None
    try:
        return parts[1], float(parts[2])
    except ValueError:
        return None


def bytecode_advice(module_file: str) -> str | None:
    """What to do where the process starting warmings finds no bytecode for `module_file`
    (torch's `__init__.py`): its warming processes would then compile torch's modules from
    source at every start (PYTHONDONTWRITEBYTECODE, an install without `__pycache__` or
    read-only). On an H100 host that set PYTHONDONTWRITEBYTECODE and shipped torch
    without bytecode, a warming's imports took 11.5 s against 4.7 with it, most of the
    warming's lead (backend_suite.md, run 52). None where the bytecode is there."""
    cached = importlib.util.cache_from_source(module_file)
    if os.path.exists(cached):
        return None
    where = os.path.dirname(os.path.dirname(module_file))
    return (
        f"no bytecode for {module_file} (looked for {cached}): every warming process hetero "
        f"starts compiles torch's modules from source first (~7 s each on an H100 host). "
        f"Write it once: `python -m compileall -q -j 0 {where}` (with PYTHONPYCACHEPREFIX "
        f"set, if that is where this Python looks)"
    )


@functools.cache
def _advise_bytecode_once() -> None:
    """Warns, once per process, where warming processes will lack bytecode."""
    spec = importlib.util.find_spec("torch")
    advice = bytecode_advice(spec.origin) if spec is not None and spec.origin else None
    if advice:
        log.warning(advice)


def handed_args(argv: Sequence[str], get_ready: Callable[[str | None], object]) -> list | None:
    """A warming module's arguments: `argv` itself, or for a Standby's process (`STANDBY
    [READY_FOR]`) `get_ready(READY_FOR)` first and then the arguments it is handed (one JSON
    list on stdin); None where it is handed none (its caller closed the pipe, or is gone)."""
    if list(argv[:1]) != [STANDBY]:
        return list(argv)
    get_ready(argv[1] if len(argv) > 1 else None)
    mark("ready")
    line = sys.stdin.readline()
    return json.loads(line) if line.strip() else None


class Warming:
    """One warming process: `python -m <module> <args>`, its output kept for the log."""

    def __init__(
        self,
        module: str,
        args: Sequence[str],
        *,
        process: subprocess.Popen | None = None,
        spawned: float | None = None,
    ) -> None:
        """`process`: a Standby's, already handed `args`, started at wall clock `spawned`;
        None starts one."""
        self.what = f"{module} {' '.join(args)}"
        self.started = time.perf_counter()
        self.handed = time.time()
        self.spawned = self.handed if spawned is None else spawned
        self._done: bool | None = None  # what `wait` found
        if process is None:
            _advise_bytecode_once()
        self._proc = process or subprocess.Popen(
            [sys.executable, "-m", module, *args],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._err: list[bytes] = []  # its stderr's lines so far
        self._marked_done = False
        # set once the process has marked DONE or has ended
        self._over = threading.Event()
        threading.Thread(target=self._read, name="hetero-warming", daemon=True).start()

    def _read(self) -> None:
        """Keeps the process's stderr read to its end (a full pipe would stop it), notes its
        DONE mark, and reaps it."""
        assert self._proc.stderr is not None  # opened as a pipe
        for line in self._proc.stderr:
            self._err.append(line)
            if (got := _marked(line)) and got[0] == DONE:
                self._marked_done = True
                self._over.set()
        self._proc.wait()
        self._over.set()

    def wait(self, timeout_s: float = WAIT_S) -> bool:
        """Waits for the process (at most `timeout_s`, then stops it); whether it finished
        its compile. A failure is logged, never raised: the load compiles without it. Once
        it has answered, it answers the same again at once."""
        if self._done is None:
            self._done = self._wait(timeout_s)
        return self._done

    def _wait(self, timeout_s: float) -> bool:
        """Until the process marks DONE (then it ends on its own) or ends."""
        if not self._over.wait(timeout_s):
            self.cancel()
            log.info("warming %s: still running after %.0f s, stopped", self.what, timeout_s)
            return False
        err = b"".join(list(self._err))
        if not self._marked_done and self._proc.returncode:
            tail = err.decode(errors="replace").strip().splitlines()[-3:]
            log.info("warming %s failed (exit %s): %s", self.what, self._proc.returncode, tail)
            return False
        log.info(
            "warming %s: %.1f s (its process, since it started: %s)",
            self.what,
            time.perf_counter() - self.started,
            marked_steps(err, self.spawned, self.handed),
        )
        return True

    def cancel(self) -> None:
        """Stops the process if it still runs (a candidate the choice no longer loads)."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


class Standby:
    """A warming process started before its work is known: `python -m <module> --standby`
    gets ready (imports, the compiler's one-time probes) and waits for its arguments.
    `start(args)` hands them over; `close()` ends a process that got none. A process whose
    parent is gone reads the end of its input and exits."""

    def __init__(self, module: str, ready_for: Sequence[str] = ()) -> None:
        """`ready_for`: what the module's standby takes after STANDBY (what to get ready
        for: a device); the work handed later may differ."""
        self.module = module
        self.spawned = time.time()
        _advise_bytecode_once()
        self._proc: subprocess.Popen | None = subprocess.Popen(
            [sys.executable, "-m", module, STANDBY, *ready_for],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    def start(self, args: Sequence[str]) -> Warming | None:
        """The process, handed `args`, as a Warming; None where it was handed some already
        or has ended (its imports failed): start a Warming of its own then."""
        proc, self._proc = self._proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            try:
                assert proc.stdin is not None  # opened as a pipe
                proc.stdin.write((json.dumps(list(args)) + "\n").encode())
                proc.stdin.close()  # all it reads: the line is in the pipe for it
                return Warming(self.module, args, process=proc, spawned=self.spawned)
            except OSError:  # it ended between the poll and the write
                pass
        _end(proc)
        log.info(
            "standby %s had ended (exit %s); a warming starts afresh", self.module, proc.returncode
        )
        return None

    def close(self) -> None:
        """Ends the process if it was never handed work (it may be importing still)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            _end(proc)


def _end(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.communicate()
