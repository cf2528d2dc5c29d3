"""A compiled causal LM (CompiledLM, `task: generate`) behind the server.

Its one input is `input_ids` int64 [batch_size, length] (the batch is the model's), its one
output `token_ids` int64 [batch_size, new tokens]. The contract checks names, dtype and
rank; CompiledLM's own check (ConfigError, mapped to INVALID_ARGUMENT) checks the rest:
every id a token of the vocabulary, and the prompt plus the new tokens within max_length.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from hetero.errors import InvalidInput
from hetero.interfaces.serving.outcome import GenerationSettings
from hetero.interfaces.serving.servable import ModelServable, plan_info
from hetero.interfaces.validation import Contract
from hetero.partitioner.graph import TensorMeta

INPUT = "input_ids"
OUTPUT = "token_ids"


class LMServable:
    """`lm.stream` per request; `ready` while the LM is not shut down."""

    generative = True

    def __init__(self, lm: Any, name: str = "") -> None:
        self.lm = lm
        self.name = name or getattr(getattr(lm, "lm", None), "model_name", "") or "lm"
        batch = int(lm.batch_size)
        self.input_metas = {INPUT: TensorMeta((batch, "length"), (batch, 1), "int64")}
        self.output_metas = {OUTPUT: TensorMeta((batch, "new_tokens"), (batch, 1), "int64")}
        self.contract = Contract.from_metas(self.input_metas)

    def check(self, inputs: Mapping[str, torch.Tensor], settings: GenerationSettings):
        """The prompt as [batch, length] int64, or ConfigError/InvalidInput naming what is wrong."""
        return self.lm.generation.check(inputs[INPUT], settings.max_new_tokens)

    def stream(self, ids: torch.Tensor, settings: GenerationSettings) -> Iterator[torch.Tensor]:
        with torch.inference_mode():
            yield from self.lm.stream(ids, **settings.stream_kwargs())

    def run_flat(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        raise InvalidInput(f"{self.name} generates; call Generate (or ModelInfer) instead")

    def ready(self) -> bool:
        return bool(self.lm.ready())

    def info(self) -> dict[str, Any]:
        plan = self.lm.plan
        rows = [
            *plan_info(getattr(plan, "prefill", None))["partitions"],
            *plan_info(getattr(plan, "decode", None))["partitions"],
        ]
        try:
            summary = self.lm.explain()
        except Exception as e:  # explain is for people; its failure must not break serving
            summary = f"(plan summary unavailable: {e})"
        return {
            "model": self.name,
            "state": "ready" if self.ready() else "not-ready",
            "plan_summary": summary,
            "partitions": rows,
            "max_length": self.lm.max_length,
            "batch_size": self.lm.batch_size,
        }

    def shutdown(self) -> None:
        self.lm.shutdown()


def prompt_inputs(values: Any, contract: Contract) -> dict[str, torch.Tensor]:
    """A prompt given as a flat list of ids (row-major [batch_size, length]) or as nested
    lists, as the contract's one input [batch_size, length] int64."""
    (rule,) = contract.inputs
    batch = rule.meta.shape[0] if isinstance(rule.meta.shape[0], int) else 1
    if isinstance(values, list) and values and all(isinstance(v, list) for v in values):
        if len({len(v) for v in values}) != 1:
            raise InvalidInput(f"{rule.name}: the prompts of a batch must have one length")
        values = [x for row in values for x in row]
    if not isinstance(values, list | tuple) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in values
    ):
        raise InvalidInput(f"{rule.name} must be a list of integer token ids")
    if not values:
        raise InvalidInput(f"{rule.name} is empty: give at least one token of prompt")
    if len(values) % batch:
        raise InvalidInput(
            f"{rule.name}: {len(values)} ids do not split into the model's batch of {batch} "
            "prompts of one length (row-major [batch_size, length])"
        )
    try:
        ids = torch.tensor(values, dtype=torch.int64).reshape(batch, -1)
    except (OverflowError, RuntimeError) as e:
        raise InvalidInput(f"{rule.name}: {e}") from None
    return {rule.name: ids}


def servable_for(compiled: Any, name: str) -> Any:
    """What serves a compiled model: an LMServable for a CompiledLM (`task: generate`), a
    ModelServable otherwise."""
    return (
        LMServable(compiled, name) if hasattr(compiled, "stream") else ModelServable(compiled, name)
    )
