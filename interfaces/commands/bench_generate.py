"""`hetero bench CONFIG` for a `task: generate` config: time to first token and ms per
decoded token (p10/p50/p90), hetero against transformers' eager `generate` of the same
model on the same prompt (greedy, the same number of new tokens), and whether the tokens
are the same."""

from __future__ import annotations

import itertools
import time
from typing import Any

import torch
from rich.table import Table

from hetero.interfaces.config import DeployConfig
from hetero.interfaces.deploy import build_compiled


def percentiles(values: list[float]) -> dict[str, float | None]:
    """p10, p50 and p90 (linear interpolation); None for no values."""
    if not values:
        return {"p10": None, "p50": None, "p90": None}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
    return {"p10": q[0], "p50": q[1], "p90": q[2]}


def _timed(tokens: Any) -> tuple[list[int], list[float]]:
    """Drain an iterator of [batch] tokens: the first sequence's ids and each arrival (ms)."""
    t0 = time.perf_counter()
    ids, times = [], []
    for t in tokens:
        times.append((time.perf_counter() - t0) * 1e3)
        ids.append(int(t.reshape(-1)[0]))
    return ids, times


class _Arrivals:
    """A transformers streamer that notes when each new token arrives (the prompt is put
    first, then one token per step)."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.times: list[float] = []
        self.ids: list[int] = []
        self._prompt = True

    def put(self, value: torch.Tensor) -> None:
        if self._prompt:
            self._prompt = False
            return
        self.times.append((time.perf_counter() - self.t0) * 1e3)
        self.ids.append(int(value.reshape(-1)[0]))

    def end(self) -> None:
        pass


def _eager(model: Any, prompt: torch.Tensor, new: int) -> tuple[list[int], list[float]]:
    arrivals = _Arrivals()
    with torch.inference_mode():
        model.generate(
            prompt,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=False,
            streamer=arrivals,
            pad_token_id=0,
        )
    return arrivals.ids, arrivals.times


def _summary(runs: list[list[float]]) -> dict[str, Any]:
    ttft = [r[0] for r in runs if r]
    gaps = [b - a for r in runs for a, b in itertools.pairwise(r)]
    return {"ttft_ms": percentiles(ttft), "ms_per_token": percentiles(gaps)}


def bench_generation(
    cfg: DeployConfig, runs: int = 10, warmup: int = 2, new_tokens: int | None = None
) -> dict[str, Any]:
    loaded = cfg.load_model()
    model = loaded.module
    prompt = loaded.example_inputs[0] if loaded.example_inputs else None
    if not isinstance(prompt, torch.Tensor):
        prompt = torch.randint(0, int(model.config.vocab_size), (cfg.generation.batch_size, 8))
    length = prompt.shape[-1]
    new = new_tokens or min(cfg.generation.max_new_tokens, cfg.generation.max_length - length)
    lm = build_compiled(cfg, loaded=loaded)
    try:
        for _ in range(warmup):
            _timed(lm.stream(prompt, new))
            _eager(model, prompt, new)
        hetero_runs, eager_runs = [], []
        hetero_ids = eager_ids = []
        for _ in range(runs):  # interleaved: both see the same machine load
            hetero_ids, times = _timed(lm.stream(prompt, new))
            hetero_runs.append(times)
            eager_ids, times = _eager(model, prompt, new)
            eager_runs.append(times)
        return {
            "config": cfg.source,
            "model": cfg.model,
            "task": "generate",
            "cluster": lm.cluster.name,
            "prompt_tokens": int(length),
            "new_tokens": int(new),
            "runs": runs,
            "threads": torch.get_num_threads(),
            "hetero": _summary(hetero_runs),
            "transformers_eager": _summary(eager_runs),
            "tokens_match": hetero_ids == eager_ids,
            "measured_programs": measured_programs(lm),
            "host_threads": (lm.feedback or {}).get("host_threads"),
        }
    finally:
        lm.shutdown()


def measured_programs(lm: Any) -> dict[str, Any]:
    """Per CPU decode stage measured in process: the program kept and each one's median ms
    (runtime/measured_choice.py; a Ray worker's choices stay in the worker)."""
    choices = getattr(getattr(lm.generation, "binder", None), "choices", {})
    return {
        name: {"chosen": c.chosen[0] if c.chosen else None, "median_ms": c.medians_ms}
        for name, c in choices.items()
    }


def generation_table(result: dict[str, Any]) -> Table:
    def ms(v: float | None) -> str:
        return "—" if v is None else f"{v:.2f}"

    t = Table(
        caption="transformers: its eager generate() of the same model, greedy",
        title=(
            f"{result['model']} on {result['cluster']}: prompt {result['prompt_tokens']}, "
            f"{result['new_tokens']} new tokens, {result['runs']} runs, {result['threads']} "
            f"threads; greedy tokens {'match' if result['tokens_match'] else 'DIFFER'}"
        ),
    )
    t.add_column("way (ms)")
    for figure in ("first token", "per token"):
        for p in ("p10", "p50", "p90"):
            t.add_column(f"{figure} {p}", justify="right")
    for label, key in (("hetero", "hetero"), ("transformers", "transformers_eager")):
        row = result[key]
        t.add_row(
            label,
            *(ms(row["ttft_ms"][p]) for p in ("p10", "p50", "p90")),
            *(ms(row["ms_per_token"][p]) for p in ("p10", "p50", "p90")),
        )
    return t
