"""CompiledLM.generate() and stream() answer an argument they do not take (transformers'
names among them) with a ConfigError saying what to give instead, before anything runs."""

from __future__ import annotations

import pytest
import torch

from hetero.errors import ConfigError
from hetero.interfaces.generate import CompiledLM


class _Untouched:
    def __getattr__(self, name):
        raise AssertionError(f"generation ran ({name}) for a refused request")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"do_sample": True}, "'do_sample'.*temperature > 0"),
        ({"max_length": 40}, "give max_new_tokens"),
        ({"attention_mask": torch.ones(1, 3)}, "not padded"),
        ({"top_p": 0.9, "num_beams": 2}, "'top_p', 'num_beams'.*use top_k.*beam search"),
        ({"frobnicate": 1}, "'frobnicate'.*leave it out"),
    ],
)
@pytest.mark.parametrize("method", ["generate", "stream"])
def test_an_argument_generate_does_not_take_is_a_config_error(method, kwargs, match):
    lm = CompiledLM(None, None, None, _Untouched())
    with pytest.raises(ConfigError, match=match):
        getattr(lm, method)(torch.tensor([[1, 2, 3]]), 4, **kwargs)
