"""Per-op facts for costing: op class, FLOPs, bytes moved, kernel launches.

FLOPs of matmuls, convolutions and attention come from torch's own formulas
(`torch.utils.flop_counter`), which count a multiply-add as two FLOPs and leave bias
adds out. Elementwise ops count one FLOP per output element, reductions one per input
element, normalisations five per element (mean, variance, normalise, scale, shift)
and softmax four (max, exp, sum, divide). View ops move no bytes and launch nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch.utils import flop_counter

aten = torch.ops.aten

OP_CLASSES = ("matmul", "conv", "attention", "norm", "reduction", "elementwise", "data", "view")

_VIEW = {
    "view", "_unsafe_view", "reshape", "permute", "expand", "unsqueeze", "squeeze", "slice",
    "select", "t", "transpose", "alias", "detach", "split", "split_with_sizes", "unbind",
    "as_strided", "getitem", "lift_fresh_copy", "sym_size", "sym_numel", "sym_stride",
    "_assert_tensor_metadata", "unflatten", "flatten", "chunk", "narrow", "view_as",
}  # fmt: skip
_MATMUL = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear", "_scaled_mm"}
_CONV = {"convolution", "_convolution", "conv2d", "conv1d"}
_ATTENTION = {
    "scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_efficient_attention",
}  # fmt: skip
_NORM = {
    "native_layer_norm", "layer_norm", "native_group_norm", "group_norm", "rms_norm",
    "_native_batch_norm_legit_no_training", "_native_batch_norm_legit", "native_batch_norm",
}  # fmt: skip
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax", "_safe_softmax"}
_REDUCTION = {
    "sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "argmax", "argmin",
    "cumsum", "any", "all", "logsumexp", "var_mean", "norm", "linalg_vector_norm",
} | _SOFTMAX  # fmt: skip
_DATA = {
    "embedding", "index", "gather", "scatter", "index_select", "cat", "stack", "clone",
    "copy", "_to_copy", "index_put", "where", "full", "arange", "zeros", "ones", "empty",
    "scalar_tensor", "full_like", "zeros_like", "ones_like", "masked_fill", "constant_pad_nd",
    "empty_strided", "new_ones", "new_zeros", "new_empty", "repeat", "tril", "triu",
}  # fmt: skip


def op_base_name(target) -> str:
    """'aten.addmm.default' -> 'addmm'; operator.getitem -> 'getitem'."""
    if hasattr(target, "_opname"):
        return target._opname
    name = getattr(target, "__name__", str(target))
    return name.split(".")[-1]


def op_class(target) -> str:
    base = op_base_name(target)
    for cls, names in (
        ("view", _VIEW),
        ("matmul", _MATMUL),
        ("conv", _CONV),
        ("attention", _ATTENTION),
        ("norm", _NORM),
        ("reduction", _REDUCTION),
        ("data", _DATA),
    ):
        if base in names:
            return cls
    return "elementwise"


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(shape)) if shape else 1


def _meta(x):
    """A meta tensor of the same (hinted) shape, for torch's flop formulas."""
    if isinstance(x, torch.Tensor):
        return torch.empty(x.shape, dtype=x.dtype, device="meta")
    if isinstance(x, list | tuple):
        return type(x)(_meta(i) for i in x)
    return x


def count_flops(
    target, args: Sequence, out, in_numels: Sequence[int], out_numels: Sequence[int]
) -> int:
    """FLOPs of one op. `args` are the op's arguments with tensors as (meta) tensors."""
    base = op_base_name(target)
    cls = op_class(target)
    if cls == "view":
        return 0
    packet = getattr(target, "overloadpacket", None)
    if packet in flop_counter.flop_registry:
        try:
            return int(flop_counter.flop_registry[packet](*_meta(args), out_val=_meta(out)))
        except Exception:  # a formula that rejects this overload's args: estimate below
            pass
    if cls == "attention":
        # q @ k^T and the weights @ v per query head; with grouped-query attention a query
        # head reads its group's key/value head (torch's sdpa formula wants equal heads and
        # raises on torch 2.11)
        q, k, v = args[0], args[1], args[2]
        *lead, sq, d = q.shape
        return 2 * numel(lead) * sq * k.shape[-2] * (d + v.shape[-1])
    if cls == "matmul" and base == "matmul":
        a = args[0]
        return 2 * numel(out.shape) * a.shape[-1]
    if cls == "norm":
        return 5 * (in_numels[0] if in_numels else 0)
    if base in _SOFTMAX:
        return 4 * (in_numels[0] if in_numels else 0)
    if cls == "reduction":
        return in_numels[0] if in_numels else 0
    if cls == "data":
        return 0
    return sum(out_numels)
