"""MetaSchedule tuning of the fused kernels, into a database that persists across runs.

`CompileOptions.tune_trials = N` (what `hetero compile --tune N` sets) tunes every fused
kernel of a partition that the database has no record for, with up to N measured trials
each, then applies the best records. The database lives under the artifact cache
(`<cache root>/.tuning/<target hash>/`, hetero/paths.py, or `TVMOptions.tuning_dir`) and is keyed
by workload (the kernel's structural hash), so a LayerNorm of the same shape tuned for one
model is reused by every other model and run. Kernels without records keep the default
schedules from schedule.py. Matmuls never reach MetaSchedule on CPU: they go to BLAS.
"""

from __future__ import annotations

import hashlib
import json
import logging
import tempfile
from pathlib import Path

from hetero.backends.base import CompileOptions
from hetero.backends.compile import progress_bar
from hetero.backends.tvm.options import TVMOptions
from hetero.paths import tuning_dir as tuning_root

log = logging.getLogger(__name__)


def tuning_dir(target, options: CompileOptions) -> Path:
    explicit = TVMOptions.parse(options, "tvm").tuning_dir
    if explicit:
        return Path(explicit)
    tag = hashlib.sha256(json.dumps(str(target)).encode()).hexdigest()[:16]
    return tuning_root() / tag


def open_database(target, options: CompileOptions):
    from tvm.s_tir import meta_schedule as ms  # optional (hetero[tvm]): loaded on first use

    where = tuning_dir(target, options)
    where.mkdir(parents=True, exist_ok=True)
    return ms.database.JSONDatabase(work_dir=str(where), module_equality="structural")


def apply_tuning(mod, target, options: CompileOptions):
    """Tune the kernels of `mod` (fused TIR) the database lacks, then apply its records."""
    from tvm import relax  # optional (hetero[tvm]): loaded on first use
    from tvm.s_tir import meta_schedule as ms  # optional (hetero[tvm]): loaded on first use

    db = open_database(target, options)
    tasks = ms.relax_integration.extract_tasks(mod, target)
    # A workload the database has seen was tuned before (maybe with no valid candidate, in
    # which case the default schedule stays): never tune it again.
    pending = [t for t in tasks if not db.has_workload(t.dispatched[0])]
    if pending:
        trials = int(options.tune_trials)
        show = TVMOptions.parse(options, "tvm").progress
        with progress_bar(show) as bar, tempfile.TemporaryDirectory() as work:
            job = bar.add_task(
                f"tuning {len(pending)} kernel(s), {trials} trials each", total=len(pending)
            )
            for task in pending:
                # A population sized to the budget: the default (512, 4 generations) spends
                # minutes per kernel before the first measurement on a small machine.
                strategy = ms.search_strategy.EvolutionarySearch(
                    population_size=max(32, 4 * trials),
                    init_min_unmeasured=max(8, trials),
                    genetic_num_iters=2,
                )
                ctxs, weights = ms.relax_integration.extracted_tasks_to_tune_contexts(
                    [task], work, strategy=strategy, seed=0
                )
                if not ctxs:  # already scheduled
                    bar.advance(job)
                    continue
                ms.tune.tune_tasks(
                    tasks=ctxs,
                    task_weights=weights,
                    work_dir=work,
                    max_trials_global=trials,
                    max_trials_per_task=trials,
                    num_trials_per_iter=min(trials, 16),
                    database=db,
                    cost_model="random",
                    # Generous timeouts: the default 30 s build timeout expires on a busy
                    # 2-core machine just starting the worker (importing TVM takes ~10 s),
                    # and a timed-out candidate is recorded as failed.
                    builder=ms.builder.LocalBuilder(max_workers=1, timeout_sec=300),
                    runner=ms.runner.LocalRunner(timeout_sec=120),
                )
                bar.advance(job)
    with target, db:
        return relax.transform.MetaScheduleApplyDatabase(enable_warning=False)(mod)
