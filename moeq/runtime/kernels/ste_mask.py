"""The straight-through estimator's weight mask applied in place: ``grad_w *= (|w| <= amax[e])``.

A QAT weight's gradient passes where the quantizer did not clip (``|w| <= amax``) and stops elsewhere. Written
as a pointwise ``grad_w * keep`` it reads the weight-gradient GEMM's output and the weight, and writes the
gradient again: 6 bytes per bf16 element. Clipped weights are rare (the amax is the calibrated max|w|), so this
kernel reads the weight alone and touches the gradient only where a weight is clipped, multiplying it by zero
there (``g * 0``: signed zeros and NaNs as the pointwise product makes them): 2 bytes per element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import cdiv, check_float, launch_kernel, run_kernel

__all__ = ["mask_clipped_grad_"]


@triton.jit
def _mask_clipped_grad_kernel(
    g_ptr,
    w_ptr,
    amax_ptr,
    M,
    N,
    stride_ge,
    stride_gm,
    stride_gn,
    stride_we,
    stride_wm,
    stride_wn,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid (N tiles, M tiles, experts): N tiles fastest, consecutive programs read adjacent weight bytes
    expert = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    w_offs = expert * stride_we + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    w = tl.load(w_ptr + w_offs, mask=inside, other=0.0).to(tl.float32)
    amax = tl.load(amax_ptr + expert)
    clipped = inside & ((tl.abs(w) <= amax) == 0)  # NaN weights and a NaN amax clip, as the comparison does
    g_offs = expert * stride_ge + rows[:, None] * stride_gm + cols[None, :] * stride_gn
    g = tl.load(g_ptr + g_offs, mask=clipped, other=0.0)
    tl.store(g_ptr + g_offs, (g.to(tl.float32) * 0.0).to(g.dtype), mask=clipped)


def mask_clipped_grad_(grad_w: torch.Tensor, w: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Zero ``grad_w`` in place where ``|w| > amax[e]`` (``grad_w * (|w| <= amax)``, bit for bit); returns it.

    ``grad_w`` and ``w`` are stacked ``[E, M, N]`` tensors of any strides; ``amax`` holds one fp32 value per
    expert (any shape of ``E`` elements, e.g. ``[E]`` or ``[E, 1, 1]``)."""
    check_float(grad_w, "grad_w")
    check_float(w, "w")
    if w.dim() != 3 or grad_w.shape != w.shape:
        raise ValueError(
            f"grad_w {tuple(grad_w.shape)} and w {tuple(w.shape)} must be the same stacked [E, M, N] shape"
        )
    if amax.numel() != w.shape[0]:
        raise ValueError(f"amax has {amax.numel()} entries for {w.shape[0]} experts")
    if grad_w.device != w.device or amax.device != w.device:
        raise ValueError(f"grad_w, w and amax must share a device, got {grad_w.device}, {w.device}, {amax.device}")
    per_expert = amax.reshape(-1).float()

    def launch():
        E, M, N = w.shape
        block_m, block_n = 8, 256
        grid = (cdiv(N, block_n), cdiv(M, block_m), E)
        launch_kernel(
            _mask_clipped_grad_kernel,
            grid,
            grad_w,
            w,
            per_expert,
            M,
            N,
            *grad_w.stride(),
            *w.stride(),
            BLOCK_M=block_m,
            BLOCK_N=block_n,
        )
        return grad_w

    def reference():
        return grad_w.mul_(w.abs() <= per_expert.view(-1, 1, 1))

    if w.numel() == 0:
        return grad_w
    return run_kernel(w, launch, reference)
