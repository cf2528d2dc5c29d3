"""The host CPU's weights re-backed by huge pages in place (runtime/host_pages.py): values
unchanged, small tensors left alone, and nothing done where the kernel cannot."""

from __future__ import annotations

import pytest
import torch

from hetero.runtime import host_pages


def test_collapse_keeps_every_value_and_skips_what_gains_nothing():
    big = torch.randn(6 << 20).to(torch.float16)  # 12 MiB: five whole huge pages inside
    small = torch.randn(1000)
    expected = big.clone(), small.clone()
    moved = host_pages.collapse([big, small])
    assert torch.equal(big, expected[0]) and torch.equal(small, expected[1])
    # only the big tensor's 2 MiB-aligned interior, and only where the kernel can
    assert moved in (0, *range(host_pages.HUGE_PAGE, big.numel() * 2 + 1, host_pages.HUGE_PAGE))
    if host_pages.available() and moved:
        assert moved >= 4 * host_pages.HUGE_PAGE


def test_without_huge_pages_nothing_is_touched(monkeypatch):
    monkeypatch.setattr(host_pages, "thp_mode", lambda: "never")
    t = torch.randn(6 << 20)
    assert not host_pages.available()
    assert host_pages.collapse([t]) == 0


@pytest.mark.parametrize("text, mode", [("always [madvise] never\n", "madvise"), ("", "")])
def test_the_kernel_s_mode_is_read_from_its_brackets(tmp_path, monkeypatch, text, mode):
    setting = tmp_path / "enabled"
    setting.write_text(text)
    monkeypatch.setattr(host_pages, "THP_SETTING", setting)
    assert host_pages.thp_mode() == mode
