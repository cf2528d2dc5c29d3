"""Compile many partitions at once: cache hits first, the rest in parallel processes.

Each job runs in a fresh `spawn` process (TVM and LLVM are not fork-safe once a thread pool
exists), looks its backend up by name in the registry it was given (pickled along) and writes through the same ArtifactCache, whose
atomic rename makes concurrent writers safe. A rich progress bar counts finished partitions.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from hetero.backends.base import Artifact, CompileOptions, CompileUnit
from hetero.backends.cache import ArtifactCache
from hetero.backends.registry import BackendRegistry, default_registry
from hetero.cluster.spec import DeviceSpec
from hetero.errors import ArtifactCorrupt, CompileError


@dataclass(frozen=True)
class CompileJob:
    """One partition to compile: what, for which device, with which backend and options."""

    unit: CompileUnit
    device: DeviceSpec
    backend: str  # a registry name, e.g. "tvm"
    options: CompileOptions = field(default_factory=CompileOptions)

    def describe(self) -> str:
        return f"partition {self.unit.name} ({self.backend} on {self.device.name})"


def compile_units(
    jobs: Sequence[CompileJob],
    cache: ArtifactCache,
    workers: int | None = None,
    progress: bool = True,
    registry: BackendRegistry | None = None,
) -> list[Artifact]:
    """Artifacts for `jobs`, in order. Raises CompileError naming the first failing partition,
    its backend, its device and the cause (after every other job has finished). `registry`:
    where the jobs' backend names are looked up (default: the built-ins and entry points)."""
    registry = registry if registry is not None else default_registry()
    results: list[Artifact | None] = [None] * len(jobs)
    todo: list[int] = []
    errors: list[tuple[int, BaseException]] = []
    for i, job in enumerate(jobs):
        try:
            key = registry.get(job.backend).artifact_key(job.unit, job.device, job.options)
        except Exception as e:  # unknown backend, untargetable device: report with the job
            errors.append((i, e))
            continue
        try:
            results[i] = cache.get(key) if key in cache else None
        except ArtifactCorrupt:
            results[i] = None  # cache.build rebuilds it
        if results[i] is None:
            todo.append(i)
    if not todo and not errors:
        return [r for r in results if r is not None]

    n = workers if workers is not None else min(len(todo), os.cpu_count() or 1)
    with progress_bar(progress) as bar:
        task = bar.add_task(
            "compiling partitions", total=len(jobs), completed=len(jobs) - len(todo)
        )
        if n <= 1 or len(todo) <= 1:
            for i in todo:
                try:
                    results[i] = _build(jobs[i], cache.root, registry)
                except Exception as e:  # collected: report every failure's partition
                    errors.append((i, e))
                bar.advance(task)
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=n, mp_context=ctx) as pool:
                futures = {pool.submit(_build, jobs[i], cache.root, registry): i for i in todo}
                for fut in as_completed(futures):
                    i = futures[fut]
                    try:
                        results[i] = fut.result()
                    except Exception as e:
                        errors.append((i, e))
                    bar.advance(task)
    if errors:
        errors.sort(key=lambda x: x[0])
        i, e = errors[0]
        more = (
            ""
            if len(errors) == 1
            else f" (and {len(errors) - 1} more: "
            + ", ".join(jobs[j].describe() for j, _ in errors[1:])
            + ")"
        )
        raise _as_compile_error(jobs[i], e, more) from e
    return [r for r in results if r is not None]


def _build(job: CompileJob, root: Path, registry: BackendRegistry) -> Artifact:
    """Runs in a worker process: compile one job through the cache."""
    try:
        backend = registry.get(job.backend)
        return ArtifactCache(root).build(backend, job.unit, job.device, job.options)
    except CompileError:
        raise
    except Exception as e:
        raise _as_compile_error(job, e, "") from e


def _as_compile_error(job: CompileJob, e: BaseException, more: str) -> CompileError:
    if isinstance(e, CompileError) and job.unit.name in str(e):
        return CompileError(f"{e}{more}")
    return CompileError(
        f"{job.backend} could not compile {job.describe()}: {type(e).__name__}: {e}{more}. "
        "Place this partition on another device or backend, or report the op that failed."
    )


def progress_bar(enabled: bool) -> Progress:
    """The bar hetero shows for long compile and tuning work (hidden when disabled)."""
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        disable=not enabled,
        transient=True,
    )
