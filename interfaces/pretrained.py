"""Models and weights by name: `hf:<id>` from the local Hugging Face cache, and weights
from a safetensors file.

hetero never downloads: an `hf:` model must already be in the cache that HF_HUB_CACHE
(else HF_HOME/hub, else ~/.cache/huggingface/hub) names, put there by `hf download <id>`
or `save_pretrained` where there is a network. Only safetensors weights are read (pickled
`.bin` checkpoints can run code when loaded); the model comes back as transformers builds
it, so its module paths are the ones Hugging Face users know (a `--device-map` export
matches them), with use_cache off so that torch.export captures it (its outputs stay
transformers' ModelOutput, a pytree of tensors: logits for a causal LM).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from hetero.errors import ConfigError

PREFIX = "hf:"
HF_ARGS = ("batch", "seq", "revision")  # what model_args may hold for an hf: model


def hub_cache() -> Path:
    """The Hugging Face hub cache this process reads (as huggingface_hub resolves it)."""
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface"
    )
    return Path(home).expanduser() / "hub"


def load_hf(
    ref: str, where: str = "model", args_where: str = "model_args", **args: Any
) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    """The model `hf:<id>` names, from the local cache only, and example `input_ids`
    (`batch` x `seq` token ids, seeded) for it: a causal LM (an architecture transformers'
    AutoModelForCausalLM builds, so logits come out) or else the bare model (hidden states)."""
    unknown = sorted(set(args) - set(HF_ARGS))
    if unknown:
        raise ConfigError(
            f"{args_where}: an {PREFIX} model takes {', '.join(HF_ARGS)}; not {', '.join(unknown)}"
        )
    model_id = ref.removeprefix(PREFIX)
    # optional (the test/bench extras) and heavy: imported when an hf: model is asked for
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import (  # optional, as above
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
    )
    from transformers.utils import logging as hf_logging  # optional, as above

    cache = hub_cache()
    source = {"cache_dir": str(cache), "local_files_only": True, "revision": args.get("revision")}
    try:
        config = AutoConfig.from_pretrained(model_id, **source)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{where}: {model_id} is not in the local Hugging Face cache {cache} "
            f"({_first_line(e)}). hetero never downloads: fetch it where there is a network "
            f"(`hf download {model_id}`) and point HF_HUB_CACHE (or HF_HOME) at that cache"
        ) from None
    config.use_cache = False  # a KV cache in the outputs is no tensor torch.export returns
    lm_heads = {n for v in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for n in _names(v)}
    causal = any(a in lm_heads for a in config.architectures or ())
    auto = AutoModelForCausalLM if causal else AutoModel
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a bar per load of a local file: hetero shows its own
    try:
        model = auto.from_pretrained(model_id, config=config, use_safetensors=True, **source)
    except (OSError, ValueError) as e:
        raise ConfigError(
            f"{where}: {model_id} has no safetensors weights in {cache} ({_first_line(e)}); "
            "hetero reads no pickled .bin checkpoint (loading one can run code)"
        ) from None
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model.eval()
    generator = torch.Generator().manual_seed(0)
    shape = (int(args.get("batch", 1)), int(args.get("seq", 32)))
    ids = torch.randint(0, int(config.vocab_size), shape, generator=generator)
    return model, (ids,)


def load_weights(module: torch.nn.Module, path: str, where: str = "weights") -> None:
    """Load the safetensors file at `path` into `module`: every tensor named, shaped and
    present as the module has it, tied ones once (a mismatch names the first that differ)."""
    try:
        state = load_file(path)
    except (OSError, SafetensorError) as e:
        raise ConfigError(f"{where}: cannot read {path} as safetensors ({e})") from None
    own = module.state_dict()
    # a tied tensor (an LM head sharing the embedding's weight) is saved once, by one name
    loaded = {own[k].data_ptr() for k in state if k in own}
    missing = sorted(k for k in set(own) - set(state) if own[k].data_ptr() not in loaded)
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k} {tuple(state[k].shape)} (the model has {tuple(own[k].shape)})"
        for k in sorted(set(own) & set(state))
        if state[k].shape != own[k].shape
    ]
    problems = [
        f"{what}: {', '.join(names[:5])}" + (f" (+{len(names) - 5} more)" if len(names) > 5 else "")
        for what, names in (("missing", missing), ("not in the model", unexpected),
                            ("wrong shape", shapes))
        if names
    ]  # fmt: skip
    if problems:
        raise ConfigError(
            f"{where}: {path} does not fit {type(module).__name__}: " + "; ".join(problems)
        )
    module.load_state_dict(state, strict=False)  # strict but for tied tensors: checked above


def _names(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
