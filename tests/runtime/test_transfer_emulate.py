"""WeightStreamer.emulate_link: a benchmark aid that must leave results alone."""

from __future__ import annotations

import torch

from hetero.runtime.weight_stream import WeightStreamer


def test_emulated_link_is_a_no_op_without_cuda_and_keeps_weights():
    weights = [{"w": torch.arange(6.0).reshape(2, 3)}, {"w": torch.ones(4)}]
    streamer = WeightStreamer(weights, "cpu")
    streamer.emulate_link(12e9, 54.6e9)
    assert streamer._pad_s_per_byte == 0.0  # nothing to pad on a host-only streamer
    for i, w in enumerate(weights):
        got = streamer.acquire(i)
        assert torch.equal(got[0], w["w"])
        streamer.release(i)


def test_a_faster_emulated_link_than_the_real_one_pads_nothing():
    streamer = WeightStreamer([{"w": torch.ones(2)}], "cpu")
    streamer.emulate_link(60e9, 54.6e9)
    assert streamer._pad_s_per_byte == 0.0
