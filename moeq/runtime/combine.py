"""The MoE combine's reference and argument checks in plain torch (no triton: the CPU path imports them)."""

from __future__ import annotations

import torch

from moeq.formats import FLOAT_DTYPES, check_float

__all__ = [
    "check_combine_args",
    "check_combine_backward_args",
    "combine_backward_dtypes",
    "combine_dtype",
    "combine_experts_backward_reference",
    "combine_experts_reference",
]


def combine_experts_reference(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    index: torch.Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """transformers' combine in plain torch: ``(y * weights[:, None])[index].view(T, top_k, H).sum(1)``, then
    cast to ``out_dtype``; ``weights`` None: ``y[index].view(T, top_k, H).sum(1)`` (a gather's gradient);
    ``mask`` (bool, y's shape): ``y * mask`` in place of ``y`` (an activation's STE mask on that gradient)."""
    y = y if mask is None else y * mask
    weighted = y if weights is None else y * weights.unsqueeze(-1)
    out = weighted[index].view(-1, top_k, y.shape[1]).sum(dim=1)
    return out if out_dtype is None else out.to(out_dtype)


def combine_dtype(y: torch.Tensor, weights: torch.Tensor | None) -> torch.dtype:
    """The dtype of the products (and of the sum unless ``out_dtype`` says otherwise)."""
    return y.dtype if weights is None else torch.promote_types(y.dtype, weights.dtype)


def check_combine_args(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    index: torch.Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
    mask: torch.Tensor | None = None,
) -> None:
    """Shapes and dtypes the combine takes; errors name the offending argument."""
    check_float(y, "y")
    if y.dim() != 2:
        raise ValueError(f"combine_experts: y must be [rows, hidden], got shape {tuple(y.shape)}")
    if weights is not None and (weights.shape != y.shape[:1] or weights.dtype not in FLOAT_DTYPES):
        raise ValueError(
            f"combine_experts: weights must be one float per row of y ({y.shape[0]}), got "
            f"{weights.dtype}{tuple(weights.shape)}"
        )
    if index.dtype not in (torch.int32, torch.int64) or index.shape != y.shape[:1]:
        raise ValueError(
            f"combine_experts: index must be int32/int64 with one entry per row of y ({y.shape[0]}), got "
            f"{index.dtype}{tuple(index.shape)}"
        )
    if top_k < 1 or y.shape[0] % top_k:
        raise ValueError(f"combine_experts: top_k ({top_k}) must be >= 1 and divide the row count ({y.shape[0]})")
    if out_dtype is not None:
        check_float(out_dtype, "out_dtype")
    if mask is not None and (mask.dtype != torch.bool or mask.shape != y.shape):
        raise ValueError(
            f"combine_experts: mask must be bool of y's shape {tuple(y.shape)}, got {mask.dtype}{tuple(mask.shape)}"
        )


def combine_backward_dtypes(
    grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.dtype, torch.dtype]:
    """The dtypes of the combine's two gradients: ``(dy, dweights)``, as eager torch promotes the products."""
    return torch.promote_types(grad.dtype, weights.dtype), torch.promote_types(grad.dtype, y.dtype)


def combine_experts_backward_reference(
    grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, top_k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the combine ``(y * weights[:, None])[inv].view(T, top_k, H).sum(1)`` given ``grad`` [T, H]
    and the sort permutation ``index`` (``inv``'s inverse), in plain torch: each routed row ``r`` takes its token's
    gradient ``g = grad[index[r] // top_k]``; ``dy[r] = g * weights[r]`` as autograd computes it, ``dweights[r] =
    sum(g * y[r])`` with the products and the sum in fp32, rounded once (as Inductor's fused reduction computes it;
    eager autograd rounds each product to bf16 first)."""
    rows = grad[index // top_k]
    dw_dtype = combine_backward_dtypes(grad, y, weights)[1]
    products = rows.to(torch.promote_types(dw_dtype, torch.float32)) * y
    return rows * weights.unsqueeze(-1), products.sum(dim=1).to(dw_dtype)


def check_combine_backward_args(
    grad: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, index: torch.Tensor, top_k: int
) -> None:
    """Shapes and dtypes the combine's backward takes; errors name the offending argument."""
    check_combine_args(y, weights, index, top_k)
    check_float(grad, "grad")
    if grad.dim() != 2 or grad.shape[1] != y.shape[1] or grad.shape[0] * top_k != y.shape[0]:
        raise ValueError(
            f"combine_experts_backward: grad must be [rows / top_k, hidden] = [{y.shape[0] // top_k}, {y.shape[1]}], "
            f"got shape {tuple(grad.shape)}"
        )
