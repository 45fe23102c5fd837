"""Calibration observer: per-expert max|x| and row counts of routed rows in one pass, no host sync."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import cdiv, check_float, known_empty, launch_kernel, observer_configs, run_kernel
from moeq.runtime.kernels.numerics import abs_bits, float_of_abs_bits
from moeq.segments import segment_amax as reference_segment_amax

__all__ = ["segment_amax", "segment_amax_"]


@triton.jit
def expert_of_rows(offs_ptr, rows, NUM_EXPERTS: tl.constexpr, E_POW2: tl.constexpr):
    """Expert id of each row: the number of cumulative offsets <= row (E for rows past the last)."""
    experts = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + experts, mask=experts < NUM_EXPERTS, other=2147483647)
    return tl.sum((ends[None, :] <= rows[:, None]).to(tl.int32), axis=1)


@triton.autotune(configs=observer_configs(), key=["K", "NUM_EXPERTS"], restore_value=["amax_ptr", "counts_ptr"])
@triton.jit
def _segment_amax_kernel(
    x_ptr,
    offs_ptr,
    amax_ptr,
    counts_ptr,
    S,
    K,
    stride_xs,
    NUM_EXPERTS: tl.constexpr,
    E_POW2: tl.constexpr,
    X_BITS: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # 1-D grid over (row tile, K tile), K tiles fastest: consecutive programs read adjacent bytes. Rows
    # are sorted by expert, so a tile almost always belongs to one expert: that is decided from its first
    # and last row alone, and then the tile issues one atomic and never computes per-row expert ids.
    k_tiles = tl.cdiv(K, BLOCK_K)
    tile_k = tl.program_id(0) % k_tiles
    row0 = (tl.program_id(0) // k_tiles) * BLOCK_S
    rows = row0 + tl.arange(0, BLOCK_S)
    cols = tile_k * BLOCK_K + tl.arange(0, BLOCK_K)
    end = tl.minimum(S, tl.load(offs_ptr + NUM_EXPERTS - 1))
    valid = rows < end
    mask = valid[:, None] & (cols[None, :] < K)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xs + cols[None, :]
    x = tl.load(x_ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    bits = abs_bits(x, X_BITS)
    count_here = tile_k == 0
    experts = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + experts, mask=experts < NUM_EXPERTS, other=2147483647)
    first = tl.sum((ends <= row0).to(tl.int32), axis=0)
    last = tl.sum((ends <= tl.minimum(row0 + BLOCK_S, end) - 1).to(tl.int32), axis=0)
    if row0 < end:
        if first == last:
            tile_amax = float_of_abs_bits(tl.max(tl.max(bits, axis=1), axis=0), x.dtype, X_BITS)
            tl.atomic_max(amax_ptr + first, tile_amax)
            if count_here:
                tl.atomic_add(counts_ptr + first, tl.sum(valid.to(tl.int64), axis=0))
        else:
            row_amax = float_of_abs_bits(tl.max(bits, axis=1), x.dtype, X_BITS)
            expert = expert_of_rows(offs_ptr, rows, NUM_EXPERTS, E_POW2)
            tl.atomic_max(amax_ptr + expert, row_amax, mask=valid)
            if count_here:
                tl.atomic_add(counts_ptr + expert, tl.full((BLOCK_S,), 1, tl.int64), mask=valid)


def _check(x: torch.Tensor, offs: torch.Tensor, num_experts: int) -> None:
    check_float(x, "x")
    if x.dim() != 2:
        raise ValueError(f"routed rows must be 2-D [S, K], got shape {tuple(x.shape)}")
    if offs.dtype != torch.int32 or offs.dim() != 1 or offs.numel() != num_experts:
        raise ValueError(
            f"offs must be int32 [{num_experts}] cumulative row counts, got {offs.dtype} {tuple(offs.shape)}"
        )
    if offs.device != x.device:
        raise ValueError(f"offs is on {offs.device} but x is on {x.device}")


def segment_amax_(
    x: torch.Tensor,
    offs: torch.Tensor,
    running_amax: torch.Tensor,
    running_counts: torch.Tensor,
    wrap: Callable[[Any], Any] | None = None,
) -> None:
    """Update running per-expert amax (fp32 ``[E]``, max) and counts (int64 ``[E]``, sum) in place.
    ``wrap``: applied to the kernel before launching (``torch.library.wrap_triton`` inside a triton_op)."""
    num_experts = running_amax.numel()
    _check(x, offs, num_experts)
    if running_amax.dtype != torch.float32 or running_counts.dtype != torch.int64:
        raise ValueError("running buffers must be float32 amax and int64 counts")
    if known_empty(x.shape[0], num_experts):
        return
    x = x if x.stride(1) == 1 else x.contiguous()

    def launch() -> None:
        def grid(meta):
            return (cdiv(x.shape[1], meta["BLOCK_K"]) * cdiv(x.shape[0], meta["BLOCK_S"]),)

        kernel = wrap(_segment_amax_kernel) if wrap is not None else _segment_amax_kernel
        launch_kernel(kernel, grid,
            x, offs, running_amax, running_counts, x.shape[0], x.shape[1], x.stride(0),
            NUM_EXPERTS=num_experts, E_POW2=triton.next_power_of_2(num_experts), X_BITS=8 * x.element_size(),
        )  # fmt: skip

    def reference() -> None:
        amax, counts = reference_segment_amax(x, offs, num_experts)
        running_amax.copy_(torch.maximum(running_amax, amax))
        running_counts.add_(counts)

    run_kernel(x, launch, reference)


def segment_amax(x: torch.Tensor, offs: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-expert ``max|x|`` (fp32 ``[E]``) and row counts (int64 ``[E]``) of routed rows ``x [S, K]``."""
    amax = torch.zeros(num_experts, dtype=torch.float32, device=x.device)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=x.device)
    segment_amax_(x, offs, amax, counts)
    return amax, counts
