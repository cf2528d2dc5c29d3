"""Resolve `pkg.module:factory` references to (model, example_inputs)."""

from __future__ import annotations

import importlib
from typing import Any

import torch

from hetero.errors import ConfigError


def load_factory(ref: str, where: str = "model", **kwargs: Any) -> tuple[torch.nn.Module, tuple]:
    if ":" not in ref:
        raise ConfigError(f"{where}: {ref!r} is not of the form 'pkg.module:factory'")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{where}: cannot import {module_name!r} ({e})") from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{where}: {module_name} has no attribute {attr!r}")
    result = factory(**kwargs)
    if not (
        isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)
    ):
        raise ConfigError(f"{where}: {ref} must return (nn.Module, example_inputs)")
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
