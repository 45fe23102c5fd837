"""The straight-through estimator's weight mask applied in place: ``grad_w *= (|w| <= amax[e])``.

A QAT weight's gradient passes where the quantizer did not clip (``|w| <= amax``) and stops elsewhere. Written
as a pointwise ``grad_w * keep`` it reads the weight-gradient GEMM's output and the weight, and writes the
gradient again: 6 bytes per bf16 element. Clipped weights are rare (the amax is the calibrated max|w|), so this
kernel reads the weight alone and touches the gradient only where a weight is clipped, multiplying it by zero
there (``g * 0``: signed zeros and NaNs as the pointwise product makes them): 2 bytes per element.

Given the weight's FP8 codes of the same step (``codes``: ``quantize_weight(w, amax)``, e4m3 of
``clamp(w / s, +-448)`` with ``s = amax / 448``, which a QAT FP8 training graph saves anyway), it reads 1 byte per
element: a code below 448 in magnitude means ``|w / s| < 432``, so ``|w| < 432 s (1 + 2^-24) < amax`` (kept).
Only codes of +-448 (clipped, or kept by rounding up to 448) and NaN codes, and every code of an expert whose
scale may be subnormal (``amax < 2^-117``), leave the decision to the weight, which is read there alone. The
result is the same bit for bit.

A load or store masked by data compiles to one predicated instruction per element, issued even when every element
is masked off; so each tile reduces its mask and branches: no weight load without an undecided code, no gradient
load and store without a clipped weight (H200, Qwen3 gate_up weight, BENCHMARKS.md session 20: 396 -> 201 us with
codes, 346 -> 228 us reading the weight). Where the codes are contiguous along N in 4-byte aligned rows (as a
quantized HF weight's are), a tile first tests four codes per 32-bit word: a byte ``b`` is undecided iff
``(b & 0x7E) == 0x7E``, i.e. iff ``(word & 0x7E7E7E7E) ^ 0x7E7E7E7E`` has a zero byte, which the exact
``(t - 0x01010101) & ~t & 0x80808080`` test finds; only a tile with one reads its codes byte by byte (session 21:
201 -> 110 us, per-element integer work was the bound).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.runtime.kernels.launch import cdiv, check_float, launch_kernel, run_kernel

__all__ = ["mask_clipped_grad_"]


#: below this amax the FP8 scale ``amax / 448`` may be subnormal (or zero), too coarse for the codes to decide
_CODES_MIN_AMAX = 2.0**-117


@triton.jit
def _mask_clipped_grad_kernel(
    g_ptr,
    w_ptr,
    amax_ptr,
    codes_ptr,
    words_ptr,
    M,
    N,
    stride_ge,
    stride_gm,
    stride_gn,
    stride_we,
    stride_wm,
    stride_wn,
    stride_ce,
    stride_cm,
    stride_cn,
    CODES: tl.constexpr,
    WORDS: tl.constexpr,
    CODES_MIN_AMAX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # grid (N tiles, M tiles, experts): N tiles fastest, consecutive programs read adjacent weight bytes
    expert = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    inside = (rows[:, None] < M) & (cols[None, :] < N)
    amax = tl.load(amax_ptr + expert)
    w_offs = expert * stride_we + rows[:, None] * stride_wm + cols[None, :] * stride_wn
    g_offs = expert * stride_ge + rows[:, None] * stride_gm + cols[None, :] * stride_gn
    if CODES:  # |code| < 448 decides "kept"; +-448 (0x7E / 0xFE) and NaN (0x7F / 0xFF) read the weight
        tiny = (amax < CODES_MIN_AMAX).to(tl.int32)  # (a NaN amax made NaN codes) a tiny one: every code undecided
        if WORDS:  # four codes per 32-bit word (contiguous codes along N, N % 4 == 0): see the module docstring
            word_cols = tl.program_id(0) * (BLOCK_N // 4) + tl.arange(0, BLOCK_N // 4)
            word_offs = expert * (stride_ce // 4) + rows[:, None] * (stride_cm // 4) + word_cols[None, :]
            words = tl.load(words_ptr + word_offs, mask=(rows[:, None] < M) & (word_cols[None, :] < N // 4), other=0)
            t = (words.to(tl.uint32, bitcast=True) & 0x7E7E7E7E) ^ 0x7E7E7E7E
            any_undecided = tl.max((((t - 0x01010101) & ~t & 0x80808080) != 0).to(tl.int32)) + tiny > 0
        else:
            any_undecided = True
        if any_undecided:  # rare with words: most tiles end here, with no per-element predicated loads
            c_offs = expert * stride_ce + rows[:, None] * stride_cm + cols[None, :] * stride_cn
            code = tl.load(codes_ptr + c_offs, mask=inside, other=0).to(tl.int32)
            undecided = inside & ((code & 0x7F) + tiny * 0x7E >= 0x7E)
            if tl.max(undecided.to(tl.int32)) > 0:  # rare: no weight load in most tiles
                w = tl.load(w_ptr + w_offs, mask=undecided, other=0.0)
                _zero_clipped(g_ptr + g_offs, w, amax, undecided)
    else:
        w = tl.load(w_ptr + w_offs, mask=inside, other=0.0)
        _zero_clipped(g_ptr + g_offs, w, amax, inside)


@triton.jit
def _zero_clipped(g_ptrs, w, amax, considered):
    """``g *= 0`` where ``considered`` and ``|w| > amax`` (NaN weights and a NaN amax clip, as the comparison
    does); the gradient is touched only in tiles with a clipped weight (the loads and stores are masked per
    element, one instruction each, so a tile without one skips them)."""
    clipped = considered & ((tl.abs(w.to(tl.float32)) <= amax) == 0)
    if tl.max(clipped.to(tl.int32)) > 0:
        g = tl.load(g_ptrs, mask=clipped, other=0.0)
        tl.store(g_ptrs, (g.to(tl.float32) * 0.0).to(g.dtype), mask=clipped)


def reads_words(codes: torch.Tensor) -> bool:
    """Whether the kernel may read ``codes [E, M, N]`` (uint8) four per 32-bit word: N contiguous, a multiple of 4,
    and every row 4-byte aligned."""
    strides_aligned = codes.stride(0) % 4 == 0 and codes.stride(1) % 4 == 0
    return codes.stride(2) == 1 and codes.shape[2] % 4 == 0 and strides_aligned and codes.data_ptr() % 4 == 0


def mask_clipped_grad_(
    grad_w: torch.Tensor, w: torch.Tensor, amax: torch.Tensor, codes: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero ``grad_w`` in place where ``|w| > amax[e]`` (``grad_w * (|w| <= amax)``, bit for bit); returns it.

    ``grad_w`` and ``w`` are stacked ``[E, M, N]`` tensors of any strides; ``amax`` holds one fp32 value per
    expert (any shape of ``E`` elements, e.g. ``[E]`` or ``[E, 1, 1]``). ``codes``: the FP8 codes of ``w`` with
    this ``amax`` (``moeq::quantize_weight``'s data viewed as ``w``'s ``[E, M, N]``, float8_e4m3fn or uint8);
    the kernel then reads the weight only where a code cannot decide (see the module docstring)."""
    check_float(grad_w, "grad_w")
    check_float(w, "w")
    if w.dim() != 3 or grad_w.shape != w.shape:
        raise ValueError(
            f"grad_w {tuple(grad_w.shape)} and w {tuple(w.shape)} must be the same stacked [E, M, N] shape"
        )
    if amax.numel() != w.shape[0]:
        raise ValueError(f"amax has {amax.numel()} entries for {w.shape[0]} experts")
    if codes is not None and (codes.shape != w.shape or codes.dtype not in (torch.float8_e4m3fn, torch.uint8)):
        raise ValueError(
            f"codes must be w's FP8 codes, float8_e4m3fn or uint8 {tuple(w.shape)}, got {codes.dtype} "
            f"{tuple(codes.shape)}"
        )
    tensors = (grad_w, w, amax) if codes is None else (grad_w, w, amax, codes)
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"grad_w, w, amax and codes must share a device, got {[str(t.device) for t in tensors]}")
    per_expert = amax.reshape(-1).float()

    def launch():
        E, M, N = w.shape
        block_m, block_n = 16, 256  # H200, Qwen3 gate_up (BENCHMARKS.md s20/s21): codes 110-119 us as words, weight 228
        grid = (cdiv(N, block_n), cdiv(M, block_m), E)
        bits = codes.view(torch.uint8) if codes is not None else per_expert
        c_strides = codes.stride() if codes is not None else (0, 0, 0)
        words = bits.view(torch.int32) if codes is not None and reads_words(bits) else None
        launch_kernel(
            _mask_clipped_grad_kernel, grid, grad_w, w, per_expert, bits, words if words is not None else bits, M, N,
            *grad_w.stride(), *w.stride(), *c_strides, CODES=codes is not None, WORDS=words is not None,
            CODES_MIN_AMAX=_CODES_MIN_AMAX, BLOCK_M=block_m, BLOCK_N=block_n,
        )  # fmt: skip
        return grad_w

    def reference():
        return grad_w.mul_(w.abs() <= per_expert.view(-1, 1, 1))

    if w.numel() == 0:
        return grad_w
    return run_kernel(w, launch, reference)
