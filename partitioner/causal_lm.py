"""A causal language model as hetero captures it for generation: `forward(input_ids, start)`
returns the logits of the last position and writes the keys and values of the new tokens
into a static KV cache that the module holds as buffers.

Any module that follows that contract can be captured as it is (see `is_cached_lm`). A
Hugging Face model (transformers >= 5) is wrapped in `StaticCacheLM`, which gives it a
`StaticCache` of a fixed maximum length whose tensors are registered buffers: torch.export
then records each layer's cache as a buffer the graph mutates in place (`index_put`), the
state the partitioner keeps with its layer.

Why a fixed maximum length: the cache's shape is static, so the one-token decode step has
one shape for the whole generation (one compiled program, one CUDA graph), and the
memory it takes is known when planning.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hetero.errors import CaptureError


def is_cached_lm(model: torch.nn.Module) -> bool:
    """True for a module that already has hetero's contract: forward(input_ids, start)."""
    try:
        params = list(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:2] == ["input_ids", "start"]


def is_hf_causal_lm(model: torch.nn.Module) -> bool:
    return hasattr(model, "config") and (
        hasattr(model, "generation_config") or hasattr(model, "lm_head")
    )


@contextlib.contextmanager
def _window_covers_cache(config: Any, max_len: int) -> Iterator[None]:
    """A sliding window at least as long as the cache excludes no position the cache holds:
    such a model attends exactly as with full attention. While inside, its config says so
    (transformers then builds full-attention cache layers and a causal mask, which export
    traces; its sliding-window mask of a static cache does not). Restored on the way out:
    the user's model is theirs."""
    window = getattr(config, "sliding_window", None)
    if not window or window < max_len:
        yield
        return
    types = getattr(config, "layer_types", None)
    try:
        config.sliding_window = None
        if types is not None:
            config.layer_types = [
                "full_attention" if t == "sliding_attention" else t for t in types
            ]
        yield
    finally:
        config.sliding_window = window
        if types is not None:
            config.layer_types = types


def _kv_shape(config: Any) -> tuple[int, int]:
    """(key/value heads, head dim) of a transformers text config."""
    heads = getattr(config, "num_attention_heads", None)
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or (config.hidden_size // heads)
    return int(kv), int(head_dim)


def _written_kv_shapes(
    model: torch.nn.Module, config: Any, cache_kw: str, layers: int
) -> tuple[list[int], list[int]] | None:
    """Per layer, (key/value heads, head dims) as the model's attention writes them: one
    token through a DynamicCache, on fake tensors (shapes only, no weight read). A config's
    numbers are not always what its attention writes: Falcon's `multi_query` writes one KV
    head where `num_kv_heads` says one per query head. None when the probe cannot run
    (then the config's numbers stand)."""
    from transformers.cache_utils import DynamicCache  # optional heavy dependency

    device = next(model.parameters()).device
    try:
        with FakeTensorMode(allow_non_fake_inputs=True), torch.no_grad():
            cache = DynamicCache(config=config)
            ids = torch.zeros((1, 1), dtype=torch.long, device=device)
            model(input_ids=ids, use_cache=True, **{cache_kw: cache})
            shapes = [(layer.keys.shape, layer.values.shape) for layer in cache.layers]
    except Exception:  # a model the probe cannot drive: its config describes its cache
        return None
    if len(shapes) != layers or any(k != v for k, v in shapes):
        return None
    return [int(k[1]) for k, _ in shapes], [int(k[-1]) for k, _ in shapes]


class StaticCacheLM(torch.nn.Module):
    """A transformers causal LM with a static KV cache held as buffers `k{i}` / `v{i}`."""

    def __init__(self, model: torch.nn.Module, batch: int, max_len: int) -> None:
        super().__init__()
        try:
            from transformers.cache_utils import StaticCache  # optional heavy dependency
        except ImportError as e:
            raise CaptureError(
                "capturing a Hugging Face model for generation needs transformers >= 5; "
                "What to do: pip install 'transformers>=5', or give a module with "
                "forward(input_ids, start) and its KV cache as buffers"
            ) from e
        config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.model = model
        self.batch = int(batch)
        self.max_len = int(max_len)
        window = getattr(config, "sliding_window", None)
        if window and window < self.max_len:
            raise CaptureError(
                f"{type(model).__name__} attends over a sliding window of {window} positions, "
                f"shorter than max_length={self.max_len}: hetero's static cache holds "
                "full-attention layers only. What to do: compile with max_length <= "
                f"{window} (the window then never excludes a position the cache holds)"
            )
        self._config = config
        try:
            with _window_covers_cache(config, self.max_len):
                cache = StaticCache(config=config, max_cache_len=self.max_len)
        except TypeError as e:
            raise CaptureError(
                f"transformers {_version()} has a StaticCache hetero does not know ({e}); "
                "What to do: use transformers >= 5"
            ) from e
        forward = inspect.signature(model.forward).parameters
        # transformers 5.17 calls it past_key_values, 5.24 cache
        self._cache_kw = "cache" if "cache" in forward else "past_key_values"
        heads, head_dim = _written_kv_shapes(
            model, config, self._cache_kw, len(cache.layers)
        ) or _kv_shape(config)
        param = next(model.parameters())
        cache.early_initialization(self.batch, heads, head_dim, param.dtype, param.device)
        self._cache = cache
        for i, layer in enumerate(cache.layers):
            if not hasattr(layer, "keys") or getattr(layer, "max_cache_len", self.max_len) < 1:
                raise CaptureError(
                    f"layer {i} of {type(model).__name__}'s cache is not a static full-attention "
                    "cache (sliding-window or shared-KV layers are not supported yet)"
                )
            self.register_buffer(f"k{i}", layer.keys, persistent=False)
            self.register_buffer(f"v{i}", layer.values, persistent=False)

    @property
    def num_layers(self) -> int:
        return len(self._cache.layers)

    def forward(self, input_ids: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self._cache.layers):
            # Export swaps the module's buffers for its own tensors while tracing: point the
            # cache at whatever the buffers are now, so its writes are the buffers' writes.
            layer.keys = getattr(self, f"k{i}")
            layer.values = getattr(self, f"v{i}")
            if hasattr(layer, "cumulative_length"):
                # the layer's own position counter, rebuilt from `start` each call: a fresh
                # tensor, so its in-place increments are no state of the program
                layer.cumulative_length = start.clone()
        length = input_ids.shape[1]
        positions = (torch.arange(length, device=input_ids.device) + start).unsqueeze(0)
        with _window_covers_cache(self._config, self.max_len):
            out = self.model(
                input_ids=input_ids,
                position_ids=positions.expand(input_ids.shape[0], -1),
                use_cache=True,
                logits_to_keep=1,
                **{self._cache_kw: self._cache},
            )
        logits = out.logits if hasattr(out, "logits") else out[0]
        return logits[:, -1]


def _version() -> str:
    try:
        import transformers  # optional heavy dependency

        return transformers.__version__
    except ImportError:
        return "(not installed)"


def as_cached_lm(model: torch.nn.Module, batch: int, max_len: int) -> torch.nn.Module:
    """`model` if it already has the contract, else a StaticCacheLM around a transformers LM."""
    if is_cached_lm(model):
        return model
    if is_hf_causal_lm(model):
        return StaticCacheLM(model, batch, max_len)
    raise CaptureError(
        f"{type(model).__name__} is neither a transformers causal LM nor a module with "
        "forward(input_ids, start) -> logits of the last position and its KV cache as "
        "buffers. What to do: pass a transformers *ForCausalLM model, or write that forward."
    )
