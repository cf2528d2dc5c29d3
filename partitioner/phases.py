"""Capture a causal LM for generation: a prefill program and a one-token decode program that
share the weights and the KV cache, the cache being state the graph updates in place.

torch.export records a buffer the model mutates as a *buffer mutation*: the functional
graph computes the new value (`index_put(cache, positions, keys)`) and returns it as an
extra output that the caller copies back. For hetero that output would be a value like any
other: a partition would ship the whole cache to the caller every step. `own_state` turns
each mutation back into an in-place write inside the graph (`index_put_` on the buffer's
placeholder, or a `copy_` into it) and drops the mutation outputs, so the write happens in
the partition that computes it, on the device that holds the buffer, and nothing of the
cache crosses a link per step.

The prefill program takes any prompt length from 2 to the cache's length (one program, a
dynamic dim, no recompiling and no padding: the static cache bounds the length anyway, and
padding to buckets would spend compute on pad tokens); a 1-token prompt runs through the
decode program.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, OutputKind

from hetero.errors import CaptureError, ConfigError
from hetero.partitioner.causal_lm import as_cached_lm
from hetero.partitioner.graph import OpGraph, decomposition_table, from_exported

PROMPT = "input_ids"
START = "start"


class Phase(str, enum.Enum):
    """The programs a generation runs: the prompt once, then one token at a time."""

    PREFILL = "prefill"
    DECODE = "decode"


@dataclass(frozen=True)
class StateSpec:
    """One buffer the model updates in place (a layer's keys or values)."""

    name: str  # its placeholder in both phases' graphs
    fqn: str  # its name in the module (`k3`)
    shape: tuple[int, ...]
    dtype: str
    nbytes: int


@dataclass(frozen=True)
class LMGraphs:
    """A causal LM captured for generation."""

    prefill: OpGraph
    decode: OpGraph
    state: tuple[StateSpec, ...]
    batch: int
    max_len: int
    vocab: int
    model_name: str

    def graph(self, phase: Phase) -> OpGraph:
        return self.prefill if phase is Phase.PREFILL else self.decode

    @property
    def state_bytes(self) -> int:
        return sum(s.nbytes for s in self.state)

    def check_prompt(self, input_ids: torch.Tensor, max_new_tokens: int = 0) -> None:
        """Raise ConfigError naming the limit when a request cannot fit the cache."""
        if input_ids.dim() != 2:
            raise ConfigError(
                f"input_ids must be [batch, length]; got shape {tuple(input_ids.shape)}"
            )
        if input_ids.shape[0] == 0:
            raise ConfigError("input_ids hold no prompt (a batch of 0): give at least one")
        if input_ids.shape[0] != self.batch:
            raise ConfigError(
                f"{self.model_name} was compiled for batch {self.batch}; got a batch of "
                f"{input_ids.shape[0]}. What to do: compile with batch_size={input_ids.shape[0]}"
            )
        length = input_ids.shape[1]
        if length < 1:
            raise ConfigError("the prompt is empty: give at least one token")
        if length + max_new_tokens > self.max_len:
            raise ConfigError(
                f"a prompt of {length} tokens plus {max_new_tokens} new ones needs "
                f"{length + max_new_tokens} cache positions; {self.model_name} was compiled "
                f"with max_length={self.max_len}. What to do: shorten the prompt, ask for "
                f"fewer tokens, or compile with a larger max_length"
            )


# ---- state: mutations become in-place writes -------------------------------------------------

_INPLACE = {
    torch.ops.aten.index_put.default: torch.ops.aten.index_put_.default,
    torch.ops.aten.index_copy.default: torch.ops.aten.index_copy_.default,
}


def own_state(ep: ExportedProgram) -> dict[str, str]:
    """Rewrite `ep`'s graph so every buffer mutation is an in-place write; returns
    {buffer placeholder: buffer fqn} of the mutated buffers. The program's signature keeps
    only its user outputs afterwards."""
    sig = ep.graph_signature
    gm = ep.graph_module
    graph = gm.graph
    placeholder = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    by_fqn = {fqn: name for name, fqn in sig.inputs_to_buffers.items()}
    order = {n: i for i, n in enumerate(graph.nodes)}
    out_node = next(n for n in graph.nodes if n.op == "output")
    mutated: dict[str, str] = {}
    for value_name, fqn in sig.buffers_to_mutate.items():
        value = next(a for a in out_node.args[0] if getattr(a, "name", None) == value_name)
        buf = placeholder[by_fqn[fqn]]
        mutated[buf.name] = fqn
        readers = [u for u in buf.users if u is not value]
        late = [u for u in readers if order[u] > order[value]]
        if value.target in _INPLACE and value.args[0] is buf and not late:
            value.target = _INPLACE[value.target]
            continue
        # Anything else: write the new value into the buffer once its old value was read.
        after = max([value, *readers], key=order.__getitem__)
        with graph.inserting_after(after):
            write = graph.call_function(torch.ops.aten.copy_.default, (buf, value))
        write.meta = {k: v for k, v in value.meta.items() if k != "val"}
        write.meta["val"] = buf.meta.get("val")
    kept = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
    out_node.args = (tuple(a for a in out_node.args[0] if a.name in {s.arg.name for s in kept}),)
    gm.recompile()
    ep._graph_signature = ExportGraphSignature(list(sig.input_specs), kept)
    return mutated


def state_specs(ep: ExportedProgram, mutated: Mapping[str, str]) -> tuple[StateSpec, ...]:
    state = dict(ep.state_dict)
    state.update(ep.constants)
    specs = []
    for name, fqn in mutated.items():
        t = state.get(fqn)
        if not isinstance(t, torch.Tensor):
            raise CaptureError(f"mutated buffer {fqn} has no tensor in the captured program")
        specs.append(
            StateSpec(
                name=name,
                fqn=fqn,
                shape=tuple(t.shape),
                dtype=str(t.dtype).removeprefix("torch."),
                nbytes=t.numel() * t.element_size(),
            )
        )
    return tuple(specs)


# ---- capture ---------------------------------------------------------------------------------


def _export(module: torch.nn.Module, args: tuple, dynamic_shapes, name: str) -> ExportedProgram:
    try:
        with torch.no_grad():
            ep = torch.export.export(module, args, dynamic_shapes=dynamic_shapes, strict=False)
            return ep.run_decompositions(decomposition_table())
    except Exception as e:  # torch raises many types here; all mean "cannot capture"
        lines = str(e).strip().splitlines()
        head = "\n    ".join(lines[:12]) + ("\n    ..." if len(lines) > 12 else "")
        raise CaptureError(
            f"torch.export could not capture {name} for generation ({type(e).__name__}):\n"
            f"    {head}\n  What to do: the model must run with a static KV cache "
            "(transformers' StaticCache) and no data-dependent Python control flow"
        ) from e


def capture_lm(
    model: torch.nn.Module,
    *,
    batch: int = 1,
    max_len: int = 256,
    example_len: int | None = None,
) -> LMGraphs:
    """The prefill and decode programs of `model` with a static cache of `max_len` positions.
    `example_len`: the prompt length prefill is captured (and so planned) at (default half
    the cache); any length from 2 to `max_len` runs.

    `model`: a transformers causal LM (wrapped in StaticCacheLM) or a module with
    forward(input_ids, start) -> logits of the last position, its cache as buffers.
    """
    for key, value in (("max_length", max_len), ("batch_size", batch)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(f"{key}={value!r}: give an integer")
    if batch < 1:
        raise ConfigError(
            f"batch_size={batch}: give the number of prompts a request holds, 1 or more"
        )
    if max_len < 3:  # a prompt of 2 or more and one new token (torch.export's Dim needs min < max)
        raise ConfigError(
            f"max_length={max_len}: a generation needs at least 3 positions (a prompt and "
            "a new token); compile with max_length=3 or more"
        )
    model.eval()
    lm = as_cached_lm(model, batch, max_len)
    name = type(model).__name__
    device = next((p.device for p in lm.parameters()), torch.device("cpu"))
    vocab = _vocab(model)
    # the prompt length prefill is planned for: its costs are this example's
    length = min(max_len - 1, max(2, example_len or max_len // 2))
    prompt = torch.zeros(batch, length, dtype=torch.long, device=device)
    start = torch.zeros((), dtype=torch.long, device=device)
    dim = torch.export.Dim("prompt", min=2, max=max_len)
    prefill_ep = _export(lm, (prompt, start), {PROMPT: {1: dim}, START: None}, name)
    decode_ep = _export(lm, (prompt[:, :1], start), None, name)
    mutated = own_state(prefill_ep)
    if own_state(decode_ep) != mutated:
        raise CaptureError(
            f"{name}'s prefill and decode programs update different buffers; the cache "
            "must be the same buffers in both"
        )
    if not mutated:
        raise CaptureError(
            f"{name} updates no buffer: it has no KV cache to generate with. What to do: "
            "give a transformers causal LM, or keep the cache as buffers written in forward"
        )
    prefill = _graph(prefill_ep, name, mutated)
    decode = _graph(decode_ep, name, mutated)
    return LMGraphs(
        prefill=prefill,
        decode=decode,
        state=state_specs(prefill_ep, mutated),
        batch=batch,
        max_len=max_len,
        vocab=vocab,
        model_name=name,
    )


def _graph(ep: ExportedProgram, name: str, mutated: Mapping[str, str]) -> OpGraph:
    return from_exported(ep, model_name=name, mutable=frozenset(mutated))


def _vocab(model: torch.nn.Module) -> int:
    config = getattr(model, "config", None)
    v = getattr(config, "vocab_size", None) if config is not None else None
    if v is None:
        v = getattr(model, "vocab_size", None)
    if v is None:
        raise CaptureError(
            f"cannot tell {type(model).__name__}'s vocabulary size: give it a `config."
            "vocab_size` or a `vocab_size` attribute"
        )
    return int(v)


__all__ = ["PROMPT", "START", "LMGraphs", "Phase", "StateSpec", "capture_lm"]
