"""Choosing the next token from a step's logits: greedy, or sampled with a temperature and
top-k. Runs where the logits are, so a GPU step never waits on the host to pick a token."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from hetero.errors import ConfigError


@dataclass(frozen=True)
class Sampling:
    """temperature 0 (the default) is greedy: the most likely token, deterministic."""

    temperature: float = 0.0
    top_k: int = 0  # keep the k most likely tokens (0: all)
    seed: int | None = None

    def __post_init__(self) -> None:
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError(f"temperature={t!r}: give a finite number, 0 (greedy) or more")
        if not whole_number(self.top_k) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r}: give an integer, 0 (no limit) or more")
        if self.seed is not None and (
            not whole_number(self.seed) or not 0 <= self.seed < SEED_LIMIT
        ):
            raise ConfigError(
                f"seed={self.seed!r}: give an integer from 0 to 2**63 - 1 (torch.Generator's "
                "range), or None"
            )
        # numpy's integers are accepted and kept as Python's (torch.Generator.manual_seed and
        # the JSON of a record take only those)
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            object.__setattr__(self, "seed", int(self.seed))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy or self.seed is None:
            return None
        g = torch.Generator(device=device)
        g.manual_seed(self.seed)
        return g


SEED_LIMIT = 2**63  # torch.Generator.manual_seed takes a signed 64-bit integer


def whole_number(x: object) -> bool:
    """An integer a caller may pass (Python's or numpy's), not a bool."""
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def next_token(
    logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None
) -> torch.Tensor:
    """[batch, vocab] logits -> [batch] token ids (int64, on the logits' device)."""
    if sampling.greedy:
        return logits.argmax(dim=-1)
    # measured from the largest score: a tiny temperature sends the others to -inf and keeps
    # the largest at 0, where dividing the raw logits made inf - inf (NaN) in the softmax; in
    # float64, where a temperature such as 1e-300 is not 0 (one vocabulary row per step)
    scores = logits.double()
    scores = (scores - scores.amax(dim=-1, keepdim=True)) / sampling.temperature
    if sampling.top_k and sampling.top_k < scores.shape[-1]:
        kth = torch.topk(scores, sampling.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
