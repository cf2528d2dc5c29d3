"""WeightStreamer on a real GPU: packed pinned copies land intact in the slots, in turn."""

from __future__ import annotations

import pytest
import torch

from hetero.runtime.weight_stream import WeightStreamer

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_every_item_arrives_intact_through_two_slots():
    g = torch.Generator().manual_seed(0)
    items = [
        {
            "w": torch.randn(64 + 8 * i, 32, generator=g, dtype=torch.float16),
            "norm": torch.randn(3, generator=g),  # odd sizes: every tensor stays aligned
            "idx": torch.arange(5 + i),
        }
        for i in range(5)
    ]
    st = WeightStreamer(items, "cuda", slots=2)
    for _ in range(2):  # a second request reuses the prefetched first items
        for i, item in enumerate(items):
            got = st.acquire(i)
            for (name, want), t in zip(item.items(), got, strict=True):
                assert t.device.type == "cuda" and t.data_ptr() % 256 == 0, name
                torch.testing.assert_close(t.cpu(), want, rtol=0, atol=0)
            st.release(i)
    torch.cuda.synchronize()
    assert st.bytes_copied >= 2 * sum(st.item_bytes)
