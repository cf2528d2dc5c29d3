"""Sampling settings as a Python caller gives them: each bad one a ConfigError that says what
to give, never torch's error from inside a generation step."""

from __future__ import annotations

import pytest
import torch

from hetero.errors import ConfigError
from hetero.runtime.sampling import Sampling, next_token


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": float("nan")}, "temperature=nan"),
        ({"temperature": float("inf")}, "temperature=inf"),
        ({"temperature": -1.0}, "0 \\(greedy\\) or more"),
        ({"temperature": "0.7"}, "finite number"),
        ({"temperature": 1.0, "top_k": 2.5}, "top_k=2.5: give an integer"),
        ({"temperature": 1.0, "top_k": -1}, "top_k=-1"),
        ({"temperature": 1.0, "seed": 1.5}, "seed=1.5"),
    ],
)
def test_bad_settings_are_config_errors(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        Sampling(**kwargs)


def test_good_settings_pick_tokens():
    logits = torch.tensor([[0.0, 3.0, 1.0]])
    assert next_token(logits, Sampling()).tolist() == [1]
    s = Sampling(temperature=1, top_k=1, seed=3)  # an int temperature is a number too
    assert next_token(logits, s, s.generator(logits.device)).tolist() == [1]
