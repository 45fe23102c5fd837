"""Per-expert max|W| and NVFP4 per-16-block amax of a stacked weight in one launch."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.formats import block_amax, expert_amax
from moeq.runtime.kernels.launch import cdiv, check_float, launch_kernel, run_kernel

__all__ = ["expert_weight_amax"]


@triton.jit
def _weight_amax_kernel(
    w_ptr,
    amax_ptr,
    block_ptr,
    M,
    K,
    stride_we,
    stride_wm,
    stride_wk,
    WITH_BLOCKS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # grid (K tiles, row tiles, experts): K tiles fastest, consecutive programs read adjacent bytes
    expert = tl.program_id(2)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    offs = expert.to(tl.int64) * stride_we + rows[:, None] * stride_wm + cols[None, :] * stride_wk
    w = tl.abs(tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32))
    tl.atomic_max(amax_ptr + expert, tl.max(tl.max(w, axis=1), axis=0))
    if WITH_BLOCKS:
        block_amax = tl.max(tl.reshape(w, (BLOCK_M, BLOCK_K // 16, 16)), axis=2)
        nb = K // 16
        bcols = tl.program_id(0) * (BLOCK_K // 16) + tl.arange(0, BLOCK_K // 16)
        b_offs = expert.to(tl.int64) * M * nb + rows[:, None] * nb + bcols[None, :]
        tl.store(block_ptr + b_offs, block_amax, mask=(rows[:, None] < M) & (bcols[None, :] < nb))


def expert_weight_amax(
    w: torch.Tensor, contraction_dim: int = -1, with_blocks: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(amax fp32 [E], block_amax fp32 [E, M, K/16] or None)`` of a stacked weight ``[E, ., .]``;
    blocks run along ``contraction_dim`` (moved last in the block tensor)."""
    check_float(w, "w")
    if w.dim() != 3:
        raise ValueError(f"expected a stacked 3-D expert weight, got shape {tuple(w.shape)}")
    k_dim = contraction_dim % 3
    m_dim = 3 - k_dim
    E, M, K = w.shape[0], w.shape[m_dim], w.shape[k_dim]
    if with_blocks and K % 16:
        raise ValueError(f"contraction dim of size {K} is not a multiple of 16")
    amax = torch.zeros(E, dtype=torch.float32, device=w.device)
    blocks = torch.zeros(E, M, K // 16, dtype=torch.float32, device=w.device) if with_blocks else None

    def launch():
        block_m, block_k = 16, 256
        grid = (cdiv(K, block_k), cdiv(M, block_m), E)
        launch_kernel(_weight_amax_kernel, grid,
            w, amax, blocks if blocks is not None else amax, M, K,
            w.stride(0), w.stride(m_dim), w.stride(k_dim),
            WITH_BLOCKS=with_blocks, BLOCK_M=block_m, BLOCK_K=block_k,
        )  # fmt: skip
        return amax, blocks

    def reference():
        return expert_amax(w), block_amax(w, k_dim) if with_blocks else None

    if w.numel() == 0:
        return amax, blocks
    return run_kernel(w, launch, reference)
