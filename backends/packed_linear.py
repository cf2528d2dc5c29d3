"""A host CPU's 16-bit Linears through oneDNN, each weight reordered once into oneDNN's
blocked layout (what Inductor's freezing does to constant weights), for programs run op by
op whose weights arrive as inputs: a generation's decode layers share one program and
bind each layer's weights per call.

Why: a batch-1 product is bound by host memory, and which kernel reads it fastest is the
host's and the shape's. On the 2-core development box (AMD EPYC, avx512_bf16) oneDNN on
packed bfloat16 weights read 40-49 GB/s where `torch.mm` read 18-28; on the H200 host's
Xeon `torch.mm` read bfloat16 faster, and packed float16 won on one shape of three
(benchmarks/cpu_gemv_kernels.py; BENCHMARKS.md, run 21). So this is one
more candidate of the CPU decode program's measured choice (runtime/measured_choice.py),
never a default.

Each weight is packed on its first call and kept, next to the unpacked one the store
holds, for as long as the module lives: the CPU's layers take twice their host memory
while this candidate is alive (the choice drops the candidates it did not keep).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

_aten = torch.ops.aten
_PACKABLE = {
    torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
    torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported,
}


def packable_dtypes() -> tuple[torch.dtype, ...]:
    """The 16-bit dtypes oneDNN has kernels for on this CPU."""
    if not torch.backends.mkldnn.is_available():
        return ()
    return tuple(t for t, supported in _PACKABLE.items() if supported())


class PackedLinear(torch.nn.Module):
    """`F.linear(x, w, b)` through oneDNN on `w` packed once (by identity: a tensor the
    caller passes again is the same weight; a new one, or one written since, is packed
    again). Other dtypes and devices take `F.linear`."""

    def __init__(self, dtypes: tuple[torch.dtype, ...]) -> None:
        super().__init__()
        self.dtypes = dtypes
        # id(w) -> (w, its version when packed, the packed weight); w held so that its id
        # is not reused while the entry lives
        self.packed: dict[int, tuple[torch.Tensor, int, torch.Tensor]] = {}

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> Any:
        if w.dtype not in self.dtypes or w.device.type != "cpu" or x.dtype != w.dtype:
            return torch.nn.functional.linear(x, w, b)
        entry = self.packed.get(id(w))
        if entry is None or entry[1] != w._version:  # held: id(w) is w's alone
            rows = max(1, x.numel() // x.shape[-1])
            entry = (w, w._version, torch.ops.mkldnn._reorder_linear_weight(w, rows))
            self.packed[id(w)] = entry
        flat = x.reshape(-1, x.shape[-1])
        y = torch.ops.mkldnn._linear_pointwise(flat, entry[2], b, "none", [], "")
        return y.reshape(*x.shape[:-1], y.shape[-1])


def pack_linears(gm: fx.GraphModule, dtypes: tuple[torch.dtype, ...]) -> int:
    """Routes `gm`'s `aten.linear` calls whose weight is an input of the program through one
    `PackedLinear` (in place; after backends.linear_fold.fold_linears). Returns how many."""
    if not dtypes:
        return 0
    routed = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != _aten.linear.default:
            continue
        w = node.args[1]
        if not isinstance(w, fx.Node) or w.op != "placeholder":
            continue  # a weight inside the program: the caller never passes it
        val = w.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dtype not in dtypes:
            continue  # traced in a dtype oneDNN has no packed kernel for here
        if not hasattr(gm, "packed_linear"):
            gm.add_submodule("packed_linear", PackedLinear(dtypes))
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module("packed_linear", tuple(node.args), dict(node.kwargs))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        routed += 1
    if routed:
        gm.recompile()
    return routed
