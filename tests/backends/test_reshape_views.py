"""reshape_views: a program traced where a value was laid out one way still runs where the
kernel that makes it lays it out another (backends/reshape_views.py says when)."""

import pytest
import torch

from hetero.backends.eager import runnable
from hetero.backends.reshape_views import reshape_views


class _Heads(torch.nn.Module):
    """Attention's output merge: [b, h, s, d] -> [b, s, h*d] as transformers writes it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.transpose(1, 2).contiguous()
        return y.view(y.shape[0], y.shape[1], -1) * 2


def _traced_on_seq_major() -> torch.fx.GraphModule:
    # the example laid out [b, s, h, d] as the host's attention kernel returns it: the
    # transpose is contiguous, so the trace keeps no `contiguous` and a bare `view`
    x = torch.randn(4, 5, 3, 2).transpose(1, 2)
    ep = torch.export.export(_Heads(), (x,))
    return runnable(ep)


def test_a_program_traced_on_one_layout_fails_on_another_without_it():
    gm = _traced_on_seq_major()
    x = torch.randn(4, 3, 5, 2)  # dense [b, h, s, d]: another kernel's layout
    with pytest.raises(RuntimeError, match="view size is not compatible"):
        gm(x)


def _out(gm, x):
    out = gm(x)
    return out[0] if isinstance(out, tuple) else out


def test_reshaped_views_give_the_eager_module_values_on_either_layout():
    gm = _traced_on_seq_major()
    assert reshape_views(gm) >= 1
    assert not [n for n in gm.graph.nodes if n.target == torch.ops.aten.view.default]
    for x in (torch.randn(4, 3, 5, 2), torch.randn(4, 5, 3, 2).transpose(1, 2)):
        torch.testing.assert_close(_out(gm, x), _Heads()(x), rtol=0, atol=0)
