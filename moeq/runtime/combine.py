"""The MoE combine's reference and argument checks in plain torch (no triton: the CPU path imports them)."""

from __future__ import annotations

import torch

from moeq.formats import FLOAT_DTYPES, check_float

__all__ = ["check_combine_args", "combine_dtype", "combine_experts_reference"]


def combine_experts_reference(
    y: torch.Tensor,
    weights: torch.Tensor | None,
    index: torch.Tensor,
    top_k: int,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """transformers' combine in plain torch: ``(y * weights[:, None])[index].view(T, top_k, H).sum(1)``, then
    cast to ``out_dtype``; ``weights`` None: ``y[index].view(T, top_k, H).sum(1)`` (a gather's gradient)."""
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
