"""Routed rows in segments: the ``offs`` layout of ``torch._grouped_mm`` (int32 cumulative row counts, one per
expert; rows at or past ``offs[-1]`` belong to no expert) and the plain-torch per-segment statistics that the
reference ops, the kernels' CPU paths and the tests share."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_offsets", "per_row_amax", "row_expert_ids", "segment_amax", "single_expert_offsets"]


def check_offsets(offs: Tensor, num_rows: int, num_experts: int) -> None:
    """Validate grouped-GEMM offsets; raises ValueError naming what is wrong.

    The dtype and shape are checked everywhere; the values (non-decreasing, >= 0, within the rows) only on the
    CPU: reading a CUDA tensor's values would stall the host on every op and break CUDA-graph capture. On the GPU,
    offsets that break those rules give unspecified results, as ``torch._grouped_mm``'s do; run a batch on the
    CPU to check them."""
    if offs.dtype != torch.int32:
        raise ValueError(
            f"expert offsets must be int32 cumulative row counts (as torch._grouped_mm takes), got {offs.dtype}"
        )
    if offs.dim() != 1 or offs.numel() != num_experts:
        raise ValueError(f"expert offsets must have shape [{num_experts}] (one per expert), got {tuple(offs.shape)}")
    if offs.device.type == "cpu" and offs.numel():
        if bool((offs[1:] < offs[:-1]).any()) or int(offs[0]) < 0:
            raise ValueError(f"expert offsets must be non-decreasing and >= 0, got {offs.tolist()}")
        if int(offs[-1]) > num_rows:
            raise ValueError(f"expert offsets end at {int(offs[-1])} but the input has only {num_rows} rows")


def single_expert_offsets(x: Tensor, expert: int, num_experts: int) -> Tensor:
    """int32 cumulative offsets ``[E]`` that route every row of ``x`` to ``expert``: the GEMM of one expert of a
    per-expert module list, observed and fake-quantized with the list's stacked per-expert statistics."""
    after = torch.arange(num_experts, device=x.device) >= expert
    return after.to(torch.int32) * x.shape[0]


def row_expert_ids(offs: Tensor, num_rows: int) -> Tensor:
    """Expert id of each row (int64 ``[S]``); rows at or past ``offs[-1]`` get ``E`` (no expert)."""
    rows = torch.arange(num_rows, device=offs.device, dtype=offs.dtype)
    return torch.searchsorted(offs, rows, right=True)


def per_row_amax(x: Tensor, offs: Tensor, amax: Tensor) -> Tensor:
    """Per-row amax ``[S, 1]`` for 2-D routed rows: the shared amax, or each row's expert's amax (rows past
    ``offs[-1]`` get the last expert's; their outputs are the caller's to discard)."""
    if amax.numel() == 1:
        return amax.reshape(1, 1)
    # rows past offs[-1] get id E; clamp only to index (their output is discarded by the caller)
    ids = row_expert_ids(offs, x.shape[0]).clamp(max=amax.numel() - 1)
    return amax[ids].unsqueeze(1)


def segment_amax(
    x: Tensor, offs: Tensor | None, num_experts: int, expert_dim: int = 0, contraction_dim: int = -1
) -> tuple[Tensor, Tensor]:
    """Per-expert ``max|x|`` (fp32 ``[E]``) and row counts (int64 ``[E]``) in one pass over ``x``.

    2-D routed rows use ``offs``; with ``offs=None``, ``x`` is batched over experts along ``expert_dim``
    and each expert's count is its number of rows that are not all zero: a zero row moves no amax, and batched
    experts that run every token (Llama 4's bmm experts) get zero rows for the tokens the router did not send them,
    so the count is the routed tokens and a cold expert shows as uncovered. A NaN anywhere in an expert's rows makes
    its amax NaN (``finalize()`` reports it).
    """
    if offs is None:
        num = x.shape[expert_dim]
        if num != num_experts:
            raise ValueError(f"batched expert input has {num} experts along dim {expert_dim}, expected {num_experts}")
        if num == 0:
            return torch.zeros(0, device=x.device), torch.zeros(0, device=x.device, dtype=torch.int64)
        xe = x.detach().movedim(expert_dim, 0)
        per_expert = xe[0].numel()
        flat = xe.reshape(num, per_expert).float()
        amax = flat.abs().amax(dim=1) if per_expert else torch.zeros(num, device=x.device)
        amax = torch.where(flat.isnan().any(dim=1), torch.full_like(amax, float("nan")), amax)
        k_dim, e_dim = contraction_dim % x.dim(), expert_dim % x.dim()
        nonzero_rows = (x.detach() != 0).any(dim=k_dim)  # False for every row when K == 0
        per_row = nonzero_rows.movedim(e_dim - (k_dim < e_dim), 0).reshape(num, -1)
        return amax, per_row.sum(dim=1, dtype=torch.int64)
    ids = row_expert_ids(offs, x.shape[0])
    xf = x.detach().float()
    row_amax = xf.abs().amax(dim=1) if x.shape[1] else torch.zeros(x.shape[0], device=x.device)
    row_amax = torch.where(xf.isnan().any(dim=1), torch.full_like(row_amax, float("nan")), row_amax)
    amax = torch.zeros(num_experts + 1, device=x.device, dtype=torch.float32)
    amax = amax.scatter_reduce(0, ids, row_amax, reduce="amax", include_self=True)
    has_nan = torch.zeros(num_experts + 1, device=x.device, dtype=torch.float32)
    has_nan = has_nan.scatter_reduce(0, ids, row_amax.isnan().float(), reduce="amax", include_self=True)
    amax = torch.where(has_nan > 0, torch.full_like(amax, float("nan")), amax)
    counts = torch.bincount(ids, minlength=num_experts + 1)
    return amax[:num_experts], counts[:num_experts].to(torch.int64)
