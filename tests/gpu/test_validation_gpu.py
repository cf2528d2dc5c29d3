"""A GPU request's values checked by kernels queued ahead of it (interfaces/validation.py
`Contract.admit`): refused as on the host, the model unharmed, and no wait on the GPU before
the request is queued."""

from __future__ import annotations

import pytest
import torch

import hetero
from hetero.errors import InvalidInput
from hetero.interfaces.models import TinyGPT

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

VOCAB = 64


def test_ids_out_of_range_on_the_gpu_are_refused_and_the_model_still_answers(tmp_path):
    torch.manual_seed(0)
    model = TinyGPT(vocab=VOCAB, dim=32, heads=2, layers=1, ctx=16).eval().cuda()
    idx = torch.randint(0, VOCAB, (1, 8), device="cuda")
    cm = hetero.compile(model, (idx,), cache_dir=tmp_path, executor="local")
    try:
        for bad in (VOCAB, -1, 2**40):
            x = idx.clone()
            x[0, 3] = bad
            with pytest.raises(InvalidInput, match=rf"'idx'.*element \[0, 3\].*is {bad}"):
                cm(x)
            with pytest.raises(InvalidInput, match=r"'idx'"):
                cm.run_flat({"idx": x})
        with torch.no_grad():
            torch.testing.assert_close(cm(idx), model(idx), rtol=2e-3, atol=2e-3)
    finally:
        cm.shutdown()
