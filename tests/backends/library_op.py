"""A library's own operator, for the tests of programs that call one: registered by
importing this module, as transformers registers its operators (backends/library_ops.py)."""

from __future__ import annotations

import torch


@torch.library.custom_op("hetero_test::scaled_add", mutates_args=())
def scaled_add(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return x + 2.0 * y


@scaled_add.register_fake
def _(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)
