"""How the threads' wait settings hold up in the three situations hetero's processes meet.

A thread-wait setting (OpenMP's OMP_WAIT_POLICY / GOMP_SPINCOUNT for torch's pool, TVM's
TVM_THREAD_POOL_SPIN_COUNT for its own) trades a process's speed alone against what it
takes from its neighbours. Each candidate is measured, in fresh processes started with
its environment, on the demo model (interfaces/models.py tiny_gpt) compiled by
hetero.compile on this CPU (each partition's backend chosen by measurement, or --backend):

  alone    one process alone on the cores: ms per forward
  pair     two such processes at once on the same cores: ms per forward, each
  busy     one process beside another program that keeps one core busy (a neighbour on
           a shared machine): ms per forward
  threads  one process whose --callers threads take turns calling the compiled model (a
           server's request threads): ms per request and requests per second

Cases run in turn, candidates alternated --repeats times; a cell is the median over the
alternations (per process: the median of its per-call times over --seconds).

    flock /tmp/cpu_bench.lock .venv/bin/python benchmarks/thread_wait.py --repeats 3

A candidate on the command line: NAME:VAR=VALUE,VAR=VALUE (VAR= unsets it; threads=N sets
the threads per process). The variables this script varies are unset first, then the
candidate's are set; TVM_BIND_THREADS=0 as hetero sets it. Writes
benchmarks/results/thread_wait.json. ONNX Runtime alongside: benchmarks/tvm_cpu.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What a candidate may change; unset before each one so that the shell's own settings do not leak in.
VARIED = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "TVM_THREAD_POOL_SPIN_COUNT", "OMP_NUM_THREADS")
DEFAULT_CANDIDATES = (
    "passive:OMP_WAIT_POLICY=PASSIVE",
    "openmp default:",
    "spincount 10000:GOMP_SPINCOUNT=10000",
    "passive, spincount 10000:OMP_WAIT_POLICY=PASSIVE,GOMP_SPINCOUNT=10000",
)
CASES = ("alone", "pair", "busy", "threads")


def parse_candidate(text: str) -> tuple[str, dict[str, str], int | None]:
    """NAME:VAR=VALUE,... -> (name, variables, threads or None)."""
    name, _, rest = text.partition(":")
    env: dict[str, str] = {}
    threads = None
    for item in filter(None, (s.strip() for s in rest.split(","))):
        var, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"candidate {text!r}: {item!r} is not VAR=VALUE")
        if var == "threads":
            threads = int(value)
        else:
            env[var] = value
    return name, env, threads


def candidate_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in VARIED}
    base["TVM_BIND_THREADS"] = "0"
    base.update({k: v for k, v in env.items() if v})
    return base


# ---- the child: one process running the compiled demo -----------------------------------


def _compiled(a):
    import torch

    from hetero.cluster.spec import ClusterSpec
    from hetero.interfaces.api import compile as hetero_compile
    from hetero.interfaces.models import tiny_gpt

    torch.set_num_threads(a.threads)
    model, args = tiny_gpt()
    cluster = ClusterSpec.local(include_gpus=False)
    cluster = cluster.with_device(cluster.devices[0].name, cores=a.threads)
    pick = {"choose": "measured"} if a.backend == "measured" else {"backends": {"cpu": a.backend}}
    cm = hetero_compile(model, args, cluster=cluster, cache_dir=a.cache, executor="local", **pick)
    chosen = [p.backend for p in cm.plan.partitions]
    return (lambda: cm(*args)), chosen


def _loop(fn, seconds: float) -> list[float]:
    """ms per call, calling fn until `seconds` have passed."""
    times = []
    end = time.perf_counter() + seconds
    while True:
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        times.append((t1 - t0) * 1e3)
        if t1 > end:
            return times


def child(case: str, a) -> dict:
    import torch

    fn, chosen = _compiled(a)
    with torch.no_grad():
        for _ in range(20):
            fn()
        if case == "pair":  # both processes ready: wait for the parent's go
            print("ready", flush=True)
            sys.stdin.readline()
        if case != "threads":
            times = _loop(fn, a.seconds)
            return {"ms": statistics.median(times), "calls": len(times), "backends": chosen}
        # Requests arrive on several threads and take turns (TVM's VM must not run one
        # model from two threads at once): each call on another thread than the last, as
        # in a server's thread pool, so every thread keeps its own OpenMP and TVM pools.
        turn = threading.Condition()
        state = {"next": 0, "end": 0.0}
        per: list[list[float]] = [[] for _ in range(a.callers)]

        def caller(i: int) -> None:
            with torch.no_grad():
                while True:
                    with turn:
                        turn.wait_for(lambda: state["next"] % a.callers == i)
                        t0 = time.perf_counter()
                        if state["end"] and t0 > state["end"]:
                            state["next"] += 1
                            turn.notify_all()
                            return
                        fn()
                        per[i].append((time.perf_counter() - t0) * 1e3)
                        state["next"] += 1
                        turn.notify_all()

        workers = [threading.Thread(target=caller, args=(i,)) for i in range(a.callers)]
        for w in workers:
            w.start()
        while state["next"] < a.callers:  # one untimed round: each thread's pools start
            time.sleep(0.01)
        t0 = time.perf_counter()
        with turn:
            for p in per:
                p.clear()
            start = state["next"]
            state["end"] = t0 + a.seconds
        for w in workers:
            w.join()
        wall = time.perf_counter() - t0
        times = [t for p in per for t in p]
        return {"ms": statistics.median(times), "per_s": len(times) / wall, "calls": len(times),
                "handoffs": state["next"] - start, "backends": chosen}  # fmt: skip


# ---- the parent: candidates x cases, alternated --------------------------------------------


def _cmd(case: str, a, threads: int) -> list[str]:
    return [sys.executable, __file__, "--child", case, "--threads", str(threads),
            "--seconds", str(a.seconds), "--callers", str(a.callers), "--backend", a.backend,
            "--cache", a.cache]  # fmt: skip


def _result(proc: subprocess.Popen, what: str) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def _busy_s() -> float:
    """CPU seconds every process on the machine has used since boot (/proc/stat)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    idle = int(fields[3]) + int(fields[4])  # idle + iowait
    return (sum(int(f) for f in fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_s() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def wait_quiet(limit_s: float = 120.0) -> float:
    """Wait (up to limit_s) until other processes use under 10% of the CPUs over half a
    second (the box is shared); returns the share they used at the end."""
    end = time.time() + limit_s
    while True:
        b0, t0 = _busy_s(), time.time()
        time.sleep(0.5)
        share = (_busy_s() - b0) / ((time.time() - t0) * os.cpu_count())
        if share < 0.1 or time.time() > end:
            return share


def run_case(case: str, env: dict[str, str], threads: int, a) -> dict:
    """One case in fresh processes; `others` is the share of the CPUs that processes other
    than this case's used meanwhile (a noisy neighbour shows there)."""
    wait_quiet()
    b0, c0, t0 = _busy_s(), _children_s(), time.time()
    r = _run_case(case, env, threads, a)
    r["others"] = max(0.0, (_busy_s() - b0) - (_children_s() - c0)) / (
        (time.time() - t0) * os.cpu_count()
    )
    return r


def _run_case(case: str, env: dict[str, str], threads: int, a) -> dict:
    if case == "busy":  # the neighbour: one thread that never sleeps, for the whole case
        spin = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            return _run_case("alone", env, threads, a)
        finally:
            spin.kill()
            spin.wait()
    if case != "pair":
        p = subprocess.Popen(_cmd(case, a, threads), env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
        return _result(p, case)
    pipes = {"stdin": subprocess.PIPE, "stdout": subprocess.PIPE, "stderr": subprocess.PIPE}
    procs = [subprocess.Popen(_cmd(case, a, threads), env=env, text=True, **pipes) for _ in "ab"]
    for p in procs:
        line = p.stdout.readline()
        if line.strip() != "ready":
            raise SystemExit(f"pair: a process did not start:\n{p.stderr.read()[-3000:]}")
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    rs = [_result(p, "pair") for p in procs]
    return {"ms": statistics.mean(r["ms"] for r in rs), "each_ms": [r["ms"] for r in rs],
            "backends": rs[0]["backends"]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--candidate", action="append", help="NAME:VAR=VALUE,... (repeatable)")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--threads", type=int, default=2, help="threads per process (torch, TVM)")
    ap.add_argument("--callers", type=int, default=4, help="threads taking turns (threads case)")
    ap.add_argument("--seconds", type=float, default=3.0, help="timed seconds per process")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backend", default="measured", help="'measured' or a backend name")
    ap.add_argument("--cache", default=None, help="artifact cache (default: the user cache)")
    ap.add_argument("--out", default=str(HERE / "results" / "thread_wait.json"))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from hetero.paths import cache_root

    a.cache = str(cache_root(a.cache))
    if a.child:
        print(json.dumps(child(a.child, a)))
        return

    cands = [parse_candidate(c) for c in (a.candidate or DEFAULT_CANDIDATES)]
    cases = [c for c in a.cases.split(",") if c]
    samples: dict[tuple[str, str], list[dict]] = {}
    for rep in range(a.repeats):
        for name, env, threads in cands:
            # alone first: it makes (and caches) the measured choice under this environment,
            # so that the pair does not measure it while disturbing each other
            for case in sorted(cases, key=CASES.index):
                r = run_case(case, candidate_env(env), threads or a.threads, a)
                samples.setdefault((name, case), []).append(r)
                print(f"[{rep + 1}/{a.repeats}] {name:<34} {case:<8} {r['ms']:7.2f} ms"
                      + (f" {r['per_s']:6.0f}/s" if "per_s" in r else "")
                      + f"  {','.join(r['backends'])}  others {r['others']:.0%}",
                      flush=True)  # fmt: skip

    rows = []
    for name, env, threads in cands:
        row = {"candidate": name, "env": env, "threads_per_process": threads or a.threads}
        for case in cases:
            s = samples[(name, case)]
            row[case] = {"ms": statistics.median(r["ms"] for r in s),
                         "samples_ms": [r["ms"] for r in s],
                         "others": [round(r["others"], 3) for r in s],
                         "backends": sorted({b for r in s for b in r["backends"]})}  # fmt: skip
            if case == "threads":
                row[case]["per_s"] = statistics.median(r["per_s"] for r in s)
        rows.append(row)
    head = "".join(f"{c:>12}" for c in cases)
    print(f"\n{'candidate':<36}{head}   (ms per forward; threads: per request, and /s)")
    for row in rows:
        cells = "".join(f"{row[c]['ms']:>12.2f}" for c in cases)
        extra = f"  {row['threads']['per_s']:.0f}/s" if "threads" in cases else ""
        print(f"{row['candidate']:<36}{cells}{extra}")
    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": a.threads,
        "callers": a.callers,
        "seconds": a.seconds,
        "repeats": a.repeats,
        "backend": a.backend,
        "load_avg": os.getloadavg(),
        "command": " ".join(["benchmarks/thread_wait.py", *sys.argv[1:]]),
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print(f"\nwrote {a.out}")


if __name__ == "__main__":
    main()
