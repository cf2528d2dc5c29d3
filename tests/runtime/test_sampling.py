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
        # torch.Generator takes a signed 64-bit seed: above it, an error from inside a step
        ({"temperature": 1.0, "seed": 2**63}, "from 0 to 2\\*\\*63 - 1"),
        ({"temperature": 1.0, "seed": -1}, "seed=-1"),
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


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e300])
@pytest.mark.parametrize("top_k", [0, 2])
def test_extreme_temperatures_still_sample(temperature, top_k):
    """A tiny temperature divided the raw logits to inf and the softmax to NaN (torch's
    multinomial then raised inside the step); from the largest score, it is greedy, and a
    huge one near uniform."""
    logits = torch.tensor([[0.0, 3.0, 1.0], [2.0, -1.0, 0.5]])
    s = Sampling(temperature=temperature, top_k=top_k, seed=7)
    got = next_token(logits, s, s.generator(logits.device))
    assert got.shape == (2,) and ((got >= 0) & (got < 3)).all()
    if temperature < 1:
        assert got.tolist() == [1, 0]


def test_numpy_integers_are_accepted_as_python_ints():
    """A caller's top_k or seed read from a numpy array counts as the integer it is, and is
    kept as Python's (what torch.Generator and a JSON record take); a bool is not one."""
    import numpy as np

    s = Sampling(temperature=0.7, top_k=np.int64(5), seed=np.uint32(3))
    assert (s.top_k, s.seed) == (5, 3)
    assert type(s.top_k) is int and type(s.seed) is int
    with pytest.raises(ConfigError, match="top_k"):
        Sampling(top_k=True)
