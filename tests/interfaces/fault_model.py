"""The model the fault suite serves: one input of each kind a request can spoil.

Token ids index a table (and their count a position table), a bool keep-mask, a float
bias per position. Importable by the `hetero serve` child (PYTHONPATH) and by the tests,
which rebuild the same weights from the seed to check every answer against eager.
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB, CTX = 64, 16


class Served(nn.Module):
    def __init__(self, vocab: int = VOCAB, dim: int = 16, ctx: int = CTX) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(ctx, dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, idx: torch.Tensor, keep: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        x = torch.where(keep.unsqueeze(-1), x, torch.zeros_like(x)) + bias.unsqueeze(-1)
        return self.head(x)


def served(batch: int = 2, seq: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    model = Served().eval()
    example = (
        torch.randint(0, VOCAB, (batch, seq)),
        torch.ones(batch, seq, dtype=torch.bool),
        torch.zeros(batch, seq),
    )
    return model, example
