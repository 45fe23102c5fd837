"""``moeq::combine_experts``: the MoE combine (routing-weight scaling, un-permute, top-k sum) as one op.

``combine_experts(y, weights, index, top_k, out_dtype=None)`` computes transformers' grouped-experts epilogue
``(y * weights[:, None])[index].view(T, top_k, H).sum(1)`` (cast to ``out_dtype`` when given; no scaling when
``weights`` is None) for the expert-sorted down-projection output ``y [T * top_k, H]``;
:func:`moeq.lowering.inductor.fuse_expert_combine` puts it in place of that chain after the down projection's
grouped GEMM, and :mod:`moeq.lowering.permutation` puts it (without weights) in a training graph's backward for
the row gather's gradient. It is a ``torch.library.triton_op``: on CUDA the body launches
:mod:`moeq.runtime.kernels.combine` through ``wrap_triton``; CPU tensors take the plain-torch reference op
``moeq::combine_experts_reference``. No autograd formula: both passes emit it after differentiation.

``combine_experts_backward(grad, y, weights, index, top_k)`` returns the combine's two gradients ``(dy, dweights)``
for the token gradient ``grad [T, H]`` and the sort permutation ``index`` (every routed row ``r`` takes
``grad[index[r] // top_k]``); :func:`moeq.lowering.inductor.fuse_combine_backward` emits it in a training graph's
backward, where the permutation pass (:mod:`moeq.lowering.permutation`) has made the combine's scatter a gather.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.library import wrap_triton

from moeq.lowering import ops
from moeq.runtime.combine import (
    check_combine_args,
    check_combine_backward_args,
    combine_backward_dtypes,
    combine_dtype,
)
from moeq.runtime.combine import combine_experts_backward_reference as _backward_reference
from moeq.runtime.combine import combine_experts_reference as _reference

__all__ = [
    "combine_experts",
    "combine_experts_backward",
    "combine_experts_backward_reference",
    "combine_experts_reference",
]


@torch.library.custom_op("moeq::combine_experts_reference", mutates_args=())
def combine_experts_reference(
    y: Tensor,
    weights: Tensor | None,
    index: Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """Plain torch, the model's own expression."""
    check_combine_args(y, weights, index, top_k, out_dtype, mask)
    return _reference(y, weights, index, top_k, out_dtype, mask)


@combine_experts_reference.register_fake
def _(y, weights, index, top_k, out_dtype=None, mask=None):
    dtype = out_dtype or combine_dtype(y, weights)
    return y.new_empty(y.shape[0] // top_k, y.shape[1], dtype=dtype)


@ops.moeq_triton_op("moeq::combine_experts", mutates_args=())
def combine_experts(
    y: Tensor,
    weights: Tensor | None,
    index: Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """``[T, H]`` in ``out_dtype`` (default: y's and weights' promoted dtype); see the module docstring.
    ``weights`` None sums the gathered rows unscaled (the gradient of a gather, :mod:`moeq.lowering.permutation`);
    ``mask`` (bool, y's shape) multiplies ``y`` first (the STE mask of the gathered activation's quantization)."""
    if ops._TRITON_ENABLED and ops.runs_triton_kernel(y):
        from moeq.runtime.kernels.combine import combine_experts as launch

        return launch(y, weights, index, top_k, out_dtype, wrap=wrap_triton, mask=mask)
    return torch.ops.moeq.combine_experts_reference(y, weights, index, top_k, out_dtype, mask)


@torch.library.custom_op("moeq::combine_experts_backward_reference", mutates_args=())
def combine_experts_backward_reference(
    grad: Tensor, y: Tensor, weights: Tensor, index: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    """Plain torch, the expressions autograd differentiates the combine into."""
    check_combine_backward_args(grad, y, weights, index, top_k)
    return _backward_reference(grad, y, weights, index, top_k)


@combine_experts_backward_reference.register_fake
def _(grad, y, weights, index, top_k):
    dy_dtype, dw_dtype = combine_backward_dtypes(grad, y, weights)
    return y.new_empty(y.shape, dtype=dy_dtype), y.new_empty(y.shape[:1], dtype=dw_dtype)


@ops.moeq_triton_op("moeq::combine_experts_backward", mutates_args=())
def combine_experts_backward(
    grad: Tensor, y: Tensor, weights: Tensor, index: Tensor, top_k: int
) -> tuple[Tensor, Tensor]:
    """``(dy [S, H], dweights [S])``, the combine's gradients; see the module docstring."""
    if ops._TRITON_ENABLED and ops.runs_triton_kernel(y):
        from moeq.runtime.kernels.combine import combine_experts_backward as launch

        return launch(grad, y, weights, index, top_k, wrap=wrap_triton)
    return torch.ops.moeq.combine_experts_backward_reference(grad, y, weights, index, top_k)
