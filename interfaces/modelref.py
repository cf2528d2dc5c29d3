"""Resolve `pkg.module:factory` references to (model, example_inputs): the one loader the
deploy config and `hetero plan pkg.module:factory` share. Whatever goes wrong names the
config's key, and a factory that raises names the user's file and line."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

import torch

from hetero.errors import ConfigError, where_raised


def load_factory(
    ref: str, where: str = "model", args_where: str = "model_args", **kwargs: Any
) -> tuple[torch.nn.Module, tuple]:
    """Import `ref`'s factory, call it with `kwargs`, check it returned (module, inputs).

    where / args_where: how messages name the reference and the arguments (a config's
    `<file>: model` and `<file>: model_args`)."""
    if ":" not in ref:
        raise ConfigError(f"{where}: {ref!r} is not of the form 'pkg.module:factory'")
    module_name, attr = ref.split(":", 1)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"{where}: cannot import {module_name} ({e}); is its package installed where this "
            "runs (on a Ray cluster: in its workers' environment)?"
        ) from None
    except Exception as e:  # the user's module raised while importing
        raise ConfigError(
            f"{where}: importing {module_name} raised {type(e).__name__}: {e}{where_raised(e)}"
        ) from None
    factory = getattr(module, attr, None)
    if factory is None:
        raise ConfigError(f"{where}: {module_name} has no {attr!r}")
    try:
        inspect.signature(factory).bind(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{args_where}: {ref} rejected them: {e}") from None
    except ValueError:  # a builtin without a signature: the call below says what is wrong
        pass
    try:
        result = factory(**kwargs)
    except Exception as e:  # the user's code: say where it failed, not a raw traceback
        raise ConfigError(
            f"{where}: {ref} raised {type(e).__name__}: {e}{where_raised(e)}"
        ) from None
    if not (
        isinstance(result, tuple)
        and len(result) == 2
        and isinstance(result[0], torch.nn.Module)
        and isinstance(result[1], tuple | list | torch.Tensor)
    ):
        raise ConfigError(
            f"{where}: {ref} must return (torch.nn.Module, example_inputs tuple); "
            f"it returned {type(result).__name__}"
        )
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, list | tuple) else (inputs,)
