"""A stacked expert weight quantized to NVFP4's stored form in one launch: what ``moeq::quantize_weight`` returns.

The stored form (:func:`moeq.formats.stored_form`) is K-last: packed E2M1 pairs in the deploy order of
:func:`moeq.formats.interleave_nvfp4_runs` (64-byte runs of 128 K elements, bytes permuted and each 32-bit
word's bits moved to where the W4A16 kernel unpacks them), e4m3 block scales ``[E, N, K/16]`` and the global scale
``g = amax / 2688`` per expert. ``moeq.reuse_weight_codes`` computes it once per optimizer step; through torch
ops (the reference) that took 54.7 ms for one Qwen3-30B-A3B layer's two expert weights on the H100 (session 42),
longer than the step itself. Here one program quantizes a ``[BLOCK_M, 128]`` tile exactly as
``numerics.fake_quant_nvfp4_blocks`` does (the same quotient, so the same codes as :mod:`moeq.formats`), packs the
codes, permutes the run's bytes and moves the word bits in registers, and stores whole words.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moeq.formats import NVFP4_RUN_BYTES, get_format, stored_form, stored_shapes
from moeq.runtime.kernels.launch import (
    as_fp32,
    cdiv,
    check_expert_grid,
    interpreting,
    launch_kernel,
    run_kernel,
    stacked_weight_dims,
)
from moeq.runtime.kernels.numerics import (
    NVFP4_FAST_G_MAX,
    NVFP4_FAST_G_MIN,
    all_within,
    nvfp4_block_quotients,
    nvfp4_global_scale,
)

__all__ = ["nvfp4_weight_codes"]

_RUN_K = 2 * NVFP4_RUN_BYTES  # K elements per 64-byte run


@triton.jit
def e2m1_code(magnitude, negative, finite_scale):
    """The E2M1 code ``sign << 3 | index`` of a magnitude on the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} (index 0-7:
    twice the value below 2, the value plus 2 below 4, half the value plus 4 above); index 0 in a block whose scale
    is NaN (formats' codes of a NaN quotient), sign from ``negative``."""
    index = tl.where(
        magnitude < 2.0, magnitude * 2.0, tl.where(magnitude < 4.0, magnitude + 2.0, magnitude * 0.5 + 4.0)
    )
    index = tl.where(finite_scale, index, 0.0).to(tl.uint32)
    return index | (negative.to(tl.uint32) << 3)


@triton.jit
def _field(word, source: tl.constexpr, width: tl.constexpr, destination: tl.constexpr):
    """Bits ``source .. source + width - 1`` of ``word`` (uint32) moved to ``destination``."""
    return ((word >> source) & ((1 << width) - 1)) << destination


@triton.jit
def deploy_word_bits(word):
    """A word of four packed bytes with its bits where :data:`moeq.formats.NVFP4_WORD_BITS` puts them: for bytes
    0-2, each nibble's magnitude bits at 6..8 and its sign at 15 (plus 16 for the high nibble), rotated left by three
    bits a byte; byte 3's nibbles with magnitude bits 0, 1 at 3, 4 and bits 2, 3 at 0, 1."""
    out = _field(word, 24, 2, 3) | _field(word, 26, 2, 0) | _field(word, 28, 2, 19) | _field(word, 30, 2, 16)
    for b in tl.static_range(3):
        for h in tl.static_range(2):
            out |= _field(word, 8 * b + 4 * h, 3, 6 + 16 * h + 3 * b)
            out |= _field(word, 8 * b + 4 * h + 3, 1, (15 + 16 * h + 3 * b) % 32)
    return out


@triton.jit
def _nvfp4_codes_kernel(
    w_ptr,
    data_ptr,
    block_ptr,
    amax_ptr,
    scale_ptr,
    M,
    K,
    stride_we,
    stride_wm,
    stride_wk,
    WORDS: tl.constexpr,  # 32-bit words of a stored row (K/2 bytes padded to whole runs, over 4)
    INTERPRET: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    RUN: tl.constexpr = 128  # K elements of a 64-byte run: one tile's width
    tile_k = tl.program_id(0)
    tile_m = tl.program_id(1)
    expert = tl.program_id(2)
    rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None, None]
    cols = tile_k * RUN + tl.arange(0, RUN // 16)[None, :, None] * 16 + tl.arange(0, 16)[None, None, :]
    w = tl.load(w_ptr + expert.to(tl.int64) * stride_we + rows * stride_wm + cols * stride_wk,
                mask=(rows < M) & (cols < K), other=0.0).to(tl.float32)  # fmt: skip
    g = nvfp4_global_scale(tl.load(amax_ptr + expert))
    if (tile_k == 0) & (tile_m == 0):  # one program per expert stores its global scale
        tl.store(scale_ptr + expert, g)
    fast = all_within(g, NVFP4_FAST_G_MIN, NVFP4_FAST_G_MAX, INTERPRET)
    magnitude, negative, scale, block_scale = nvfp4_block_quotients(w, g, fast, INTERPRET)
    codes = e2m1_code(magnitude, negative, scale == scale)
    # the run's block scales, K-last [E, M, K/16]
    out_rows = tile_m * BLOCK_M + tl.arange(0, BLOCK_M)[:, None]
    b_cols = tile_k * (RUN // 16) + tl.arange(0, RUN // 16)[None, :]
    scales = tl.reshape(block_scale, [BLOCK_M, RUN // 16]).to(tl.float8e4nv, fp_downcast_rounding="rtne")
    scales = scales.to(tl.uint8, bitcast=True)
    tl.store(block_ptr + (expert.to(tl.int64) * M + out_rows) * tl.cdiv(K, 16) + b_cols, scales,
             mask=(out_rows < M) & (b_cols < tl.cdiv(K, 16)))  # fmt: skip
    # pairs (element 2k low nibble), then the run's byte order: byte 8j + 4h + c at 16c + 2j + h
    lo, hi = tl.split(tl.reshape(codes, [BLOCK_M, RUN // 2, 2]))
    pairs = tl.permute(tl.reshape(lo | (hi << 4), [BLOCK_M, 8, 2, 4]), [0, 3, 1, 2])  # (row, c, j, h)
    even, odd = tl.split(tl.reshape(pairs, [BLOCK_M, RUN // 8, 2, 2]))  # a word's bytes 0, 2 and 1, 3
    b0, b2 = tl.split(even)
    b1, b3 = tl.split(odd)
    words = deploy_word_bits(b0 | (b1 << 8) | (b2 << 16) | (b3 << 24))
    w_cols = tile_k * (RUN // 8) + tl.arange(0, RUN // 8)[None, :]
    tl.store(data_ptr + (expert.to(tl.int64) * M + out_rows) * WORDS + w_cols, words.to(tl.int32, bitcast=True),
             mask=out_rows < M)  # fmt: skip


def nvfp4_weight_codes(
    w: torch.Tensor,
    weight_amax: torch.Tensor,
    contraction_dim: int,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``stored_form(formats NVFP4.quantize(w, amax))`` of a stacked expert weight ``[E, ., .]`` with per-expert
    ``weight_amax [E]``: ``(data uint8 [E, N, K/2 padded to 64-byte runs], scale fp32 [E], block_scale uint8
    [E, N, K/16])``, bit for bit. ``out``: written into these three tensors instead (their addresses kept)."""
    k_dim, m_dim = stacked_weight_dims(w, contraction_dim, "nvfp4_weight_codes")
    if weight_amax.numel() != w.shape[0]:
        raise ValueError(f"weight_amax has {weight_amax.numel()} entries for {w.shape[0]} experts")
    fmt = get_format("nvfp4")
    fmt.check_shape(w.shape, k_dim, "stacked expert weight")
    E, M, K = w.shape[0], w.shape[m_dim], w.shape[k_dim]
    data_shape, block_shape = stored_shapes(w.shape, "nvfp4", k_dim)
    shapes = (data_shape, (E,), block_shape)
    if out is None:
        out = tuple(w.new_empty(s, dtype=t) for s, t in zip(shapes, (torch.uint8, torch.float32, torch.uint8)))
    got = [(tuple(t.shape), t.dtype, t.device, t.is_contiguous()) for t in out]
    want = [(s, t, w.device, True) for s, t in zip(shapes, (torch.uint8, torch.float32, torch.uint8))]
    if got != want:
        raise ValueError(f"nvfp4_weight_codes: out is {got}, needs {want}")
    data, scale, block = out
    amax = as_fp32(weight_amax).reshape(-1)

    def reference() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        stored = stored_form(fmt.quantize(w, amax.view(-1, 1, 1), k_dim))
        for tensor, value in zip(out, stored):
            tensor.copy_(value)
        return out

    def launch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        block_m = 4 if interpreting() else 32
        check_expert_grid("nvfp4_weight_codes", w, M, block_m)
        launch_kernel(_nvfp4_codes_kernel, (cdiv(K, _RUN_K), cdiv(M, block_m), E),
            w, data.view(torch.int32), block, amax, scale, M, K, w.stride(0), w.stride(m_dim), w.stride(k_dim),
            WORDS=data_shape[-1] // 4, INTERPRET=interpreting(), BLOCK_M=block_m, num_warps=4,
        )  # fmt: skip
        return out

    if w.numel() == 0:
        scale.copy_(fmt.scale_from_amax(amax))
        return out
    return run_kernel(w, launch, reference)
